//! Power of two choices: two distinct random endpoints, the less loaded one wins.

use std::fmt;
use std::time::Duration;

use super::alias::AliasTable;
use super::{Endpoint, Endpoints, PickContext, Picker, Strategy};
use crate::error::ConfigError;
use crate::util::rng::split;

/// Draws two distinct endpoints at random and sends the request to the less loaded one.
///
/// Comparing two random endpoints avoids the hot spots of "least loaded of all" (every
/// client piling onto the same idle endpoint) while still steering away from busy ones; the
/// pick costs O(1) whatever the number of endpoints.
///
/// # Load
///
/// - [`PowerOfTwoChoices::new`]: load is the number of requests in flight to the endpoint,
///   from every clone of the balancer. No clock is read.
/// - [`PowerOfTwoChoices::peak_ewma`]: load is the endpoint's latency estimate × (requests in
///   flight + 1), the cost this request can expect there (Finagle's and tower's PeakEWMA). The
///   estimate follows the latency of every response: it jumps up toward a slower one, at most
///   doubling per response (so one stall of the client is not taken for a slow endpoint,
///   while a run of slow responses lifts it within a few), and decays toward faster ones with
///   the [`decay`](Self::decay) time constant (default 10 s); without responses it decays
///   toward zero, so an endpoint avoided for being slow is tried again later. Estimates below
///   the [`latency_resolution`](Self::latency_resolution) (default 1 ms) count as equal to
///   it. An endpoint with no response yet is *probed*: while idle it costs nothing, so a new
///   endpoint gets a request at once, and each request in flight to it counts as
///   [`default_rtt`](Self::default_rtt) (default 30 ms, linkerd's) until its first response
///   gives it a real estimate. (Charging an idle new endpoint the default would starve it
///   whenever the others answer faster than that: only an answer can change it.) The second
///   endpoint must be more than 10% less loaded, and by at least the latency resolution, to
///   take the request, so loads within 10% count as equal: estimates are noisy, and noise
///   should not outvote weights (see below).
///   The balancer reads the clock once per pick and once per response.
///
/// # Ties and weights
///
/// The first endpoint is drawn in proportion to its weight (uniformly when all weights are
/// equal) and keeps the request unless the second is less loaded. With equal weights this is
/// a fair coin between the two, so endpoints that look equally loaded — all idle, or all
/// answering instantly — share requests evenly rather than in table order. With weights it
/// makes the shares follow the weights exactly while loads are equal: with weights 99:1 and
/// two endpoints the pair is always the same two, so only the draw of the first can give the
/// light endpoint 1% (a coin flip would give it half).
///
/// For the comparison an endpoint of weight `w` counts as `w / w_min` copies of the lightest
/// endpoint (`w_min`) that share its requests: its load is measured per copy, in whole
/// requests (`in_flight × w_min / w`, rounded down), which is what a new request meets on its
/// least busy copy. So a heavy endpoint takes `w / w_min` requests at once before it looks
/// busier than an idle light one, and with weights 99:1 the light endpoint gets about 1% of
/// the requests at any concurrency, not "one request whenever it is idle".
///
/// Latency is weighed per copy too. An endpoint that answers 99 times as many requests meets
/// 99 times as many stalls (a client thread preempted, a collection pause), and a peak
/// estimate holds the worst of them: judged as a whole, the heavy endpoint would look slower
/// than an equally fast light one, lose comparisons, stop getting the responses that would
/// correct its estimate, and the light endpoint would take most of the traffic (the heavy
/// one got 8–67% in our tests). So the estimate is that of one copy: a slower response
/// raises it by `w_min / w` of the difference, as it raises the average of the copies' own
/// peaks.
/// With weights 99:1 over equally fast endpoints the heavy one gets 99% ± 1%, whether they
/// answer at once or in 10 ms, one request at a time or eight (`tests/weights.rs`).
///
/// The second draw is also proportional to weight, redrawn (at most four draws) while it
/// hits the first endpoint; when a dominant weight makes all of them hit it, the second is
/// drawn uniformly from the others. A uniform fallback rather than "the next endpoint" keeps
/// the light endpoints equally likely to be the alternative; either way the pick stays O(1).
/// The proportional draws use an alias table built with the picker, off the request path.
///
/// # Failures
///
/// An endpoint that fails fast looks idle (and, under PeakEWMA, fast), so a load-aware
/// balancer would send it *more* requests — a black hole. Here, after `n` failed responses in
/// a row ([`Endpoint::consecutive_failures`]) an endpoint takes part in a comparison only
/// with probability 1 / (1 + penalty × n) and otherwise loses it to the other endpoint
/// (unless that one is out of the running too). With the default penalty of 1 a failing
/// endpoint gets at most its fair share from its first failure on, and less the longer it
/// keeps failing; it is never shut out for good, so it is tried again now and then and
/// recovers fully on its first success. A fixed penalty in the load would not heal: the run
/// of failures only ends with a success, and at low load a penalized endpoint would never be
/// picked to have one. Set the penalty with [`error_penalty`](Self::error_penalty); 0 turns
/// it off. Ejecting failing endpoints for a time is outlier detection's job, not this one's.
///
/// It does not need the request, so it picks in `poll_ready`; if the chosen endpoint is not
/// ready the balancer asks again (see [the module docs](crate::strategy)).
///
/// Pick cost: O(1), no allocation, no lock, no write to shared memory: one random number (a
/// few more with weights or failures), and under PeakEWMA two latency estimates. Measured on
/// a small x86-64 VM (`cargo bench --bench overhead`), a whole request through the balancer
/// adds 20–29 ns over a direct call counting requests in flight and 45–60 ns under PeakEWMA,
/// from 16 to 4096 endpoints; about 19 ns of the latter are the balancer's two clock reads per
/// request.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::{strategy::PowerOfTwoChoices, BalanceLayer};
///
/// // Fewest requests in flight, from two random endpoints.
/// let layer = BalanceLayer::new(PowerOfTwoChoices::new());
///
/// // Latency-aware, reacting faster than the 10 s default.
/// let peak_ewma = PowerOfTwoChoices::peak_ewma()
///     .decay(Duration::from_secs(2))?
///     .default_rtt(Duration::from_millis(5))?;
/// let layer = BalanceLayer::new(peak_ewma);
/// # let _ = layer;
/// # Ok::<(), tower_lb::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct PowerOfTwoChoices {
    load: Load,
    error_penalty: f64,
}

/// What "less loaded" means.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Load {
    InFlight,
    PeakEwma {
        decay: Duration,
        default_rtt: Duration,
        resolution: Duration,
    },
}

impl PowerOfTwoChoices {
    /// The default [`decay`](Self::decay) of PeakEWMA estimates: 10 s, as in tower, Finagle and
    /// linkerd.
    pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
    /// The default [`default_rtt`](Self::default_rtt): 30 ms, linkerd's.
    pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
    /// The default [`error_penalty`](Self::error_penalty): 1.
    pub const DEFAULT_ERROR_PENALTY: f64 = 1.0;
    /// The default [`latency_resolution`](Self::latency_resolution): 1 ms.
    pub const DEFAULT_RESOLUTION: Duration = Duration::from_millis(1);

    /// Load is the number of requests in flight.
    pub fn new() -> Self {
        Self {
            load: Load::InFlight,
            error_penalty: Self::DEFAULT_ERROR_PENALTY,
        }
    }

    /// Load is the PeakEWMA latency estimate × (requests in flight + 1).
    pub fn peak_ewma() -> Self {
        Self {
            load: Load::PeakEwma {
                decay: Self::DEFAULT_DECAY,
                default_rtt: Self::DEFAULT_RTT,
                resolution: Self::DEFAULT_RESOLUTION,
            },
            error_penalty: Self::DEFAULT_ERROR_PENALTY,
        }
    }

    /// How fast a PeakEWMA estimate forgets: the time constant with which it decays toward
    /// faster responses, and toward zero without responses. Shorter reacts faster and is
    /// noisier.
    ///
    /// Rejected when zero, or when this is not a [`peak_ewma`](Self::peak_ewma) strategy.
    pub fn decay(self, decay: Duration) -> Result<Self, ConfigError> {
        let Load::PeakEwma {
            default_rtt,
            resolution,
            ..
        } = self.load
        else {
            return Err(not_peak_ewma("decay"));
        };
        if decay.is_zero() {
            return Err(ConfigError::new(
                "decay",
                "must be greater than zero; it is the time constant of the latency estimate",
            ));
        }
        Ok(Self {
            load: Load::PeakEwma {
                decay,
                default_rtt,
                resolution,
            },
            ..self
        })
    }

    /// The latency counted for each request in flight to an endpoint that has not answered
    /// yet (an idle one costs nothing, so that it is probed). Set it near the latency you
    /// expect: lower loads new endpoints faster before their first answer, higher more
    /// cautiously.
    ///
    /// Rejected when zero, or when this is not a [`peak_ewma`](Self::peak_ewma) strategy.
    pub fn default_rtt(self, default_rtt: Duration) -> Result<Self, ConfigError> {
        let Load::PeakEwma {
            decay, resolution, ..
        } = self.load
        else {
            return Err(not_peak_ewma("default_rtt"));
        };
        if default_rtt.is_zero() {
            return Err(ConfigError::new(
                "default_rtt",
                "must be greater than zero, or every request would pile onto endpoints that \
                 have not answered yet",
            ));
        }
        Ok(Self {
            load: Load::PeakEwma {
                decay,
                default_rtt,
                resolution,
            },
            ..self
        })
    }

    /// The finest latency difference PeakEWMA acts on: estimates below it count as equal to
    /// it, and a cost must be lower by at least this much (besides the 10% margin) to win
    /// (default [`DEFAULT_RESOLUTION`](Self::DEFAULT_RESOLUTION), 1 ms, the resolution at
    /// which nginx and HAProxy time responses).
    ///
    /// Below a millisecond, what an estimate measures is mostly scheduling noise, and it is
    /// not even noise that weighs endpoints alike: an estimate jumps to its worst recent
    /// sample, and an endpoint that answers more requests meets more bad samples. Without a
    /// resolution, two equally fast endpoints weighted 99:1 that answer in microseconds
    /// share requests by the luck of their last hiccups (the heavy one got 60–90% in our
    /// tests). With it, they tie, and the weights decide. Lower it for endpoints whose
    /// sub-millisecond differences are real and steady.
    ///
    /// Rejected when zero, or when this is not a [`peak_ewma`](Self::peak_ewma) strategy.
    pub fn latency_resolution(self, resolution: Duration) -> Result<Self, ConfigError> {
        let Load::PeakEwma {
            decay, default_rtt, ..
        } = self.load
        else {
            return Err(not_peak_ewma("latency_resolution"));
        };
        if resolution.is_zero() {
            return Err(ConfigError::new(
                "latency_resolution",
                "must be greater than zero; use 1 ns to compare estimates as they are",
            ));
        }
        Ok(Self {
            load: Load::PeakEwma {
                decay,
                default_rtt,
                resolution,
            },
            ..self
        })
    }

    /// How strongly failures in a row count against an endpoint: after `n` of them it takes
    /// part in a comparison only with probability 1 / (1 + `penalty` × `n`). 0 turns error
    /// awareness off; the default is 1.
    ///
    /// Rejected when negative, NaN or infinite (an infinite penalty would shut a failing
    /// endpoint out until other endpoints fail too, so it could never show it recovered).
    pub fn error_penalty(self, penalty: f64) -> Result<Self, ConfigError> {
        if !penalty.is_finite() || penalty < 0.0 {
            return Err(ConfigError::new(
                "error_penalty",
                format!("{penalty} is not a finite number of at least 0 (0 turns it off)"),
            ));
        }
        Ok(Self {
            error_penalty: penalty,
            ..self
        })
    }
}

fn not_peak_ewma(setting: &'static str) -> ConfigError {
    ConfigError::new(
        setting,
        "only applies to latency-aware P2C; start from PowerOfTwoChoices::peak_ewma()",
    )
}

impl Default for PowerOfTwoChoices {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for PowerOfTwoChoices {
    type Picker = PowerOfTwoChoicesPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> PowerOfTwoChoicesPicker {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight().max(1)).collect();
        let sampler = match (weights.iter().min(), weights.iter().max()) {
            (Some(min), Some(max)) if min != max => Sampler::weighted(&weights),
            _ => Sampler::Uniform,
        };
        if let Load::PeakEwma { .. } = self.load {
            // Each endpoint's estimate is that of one copy of the lightest endpoint. With
            // unequal weights the copies also forget within a number of their own samples, so
            // that heavy and light endpoints, sampled at rates as unequal as their weights,
            // keep comparable estimates; with equal weights time alone decides, as in tower.
            let w_min = weights.iter().copied().min().unwrap_or(1);
            let forget = if matches!(sampler, Sampler::Weighted { .. }) {
                WEIGHTED_FORGET_PER_SAMPLE
            } else {
                0.0
            };
            for (i, &w) in weights.iter().enumerate() {
                endpoints
                    .state(i)
                    .set_latency_model(f64::from(w_min) / f64::from(w), forget);
            }
        }
        let load = match self.load {
            Load::InFlight => PickerLoad::InFlight,
            Load::PeakEwma {
                decay,
                default_rtt,
                resolution,
            } => PickerLoad::PeakEwma {
                decay,
                default_rtt_ns: default_rtt.as_nanos() as f64,
                resolution_ns: resolution.as_nanos() as f64,
            },
        };
        PowerOfTwoChoicesPicker {
            sampler,
            load,
            error_penalty: self.error_penalty,
        }
    }
}

/// The picker [`PowerOfTwoChoices`] builds: the weight tables of one endpoint set.
pub struct PowerOfTwoChoicesPicker {
    sampler: Sampler,
    load: PickerLoad,
    error_penalty: f64,
}

enum PickerLoad {
    InFlight,
    PeakEwma {
        decay: Duration,
        default_rtt_ns: f64,
        resolution_ns: f64,
    },
}

/// With unequal weights, the least part of the way to a faster response each of a copy's
/// responses moves its estimate: peaks fade within about 64 of them.
const WEIGHTED_FORGET_PER_SAMPLE: f64 = 1.0 / 64.0;

/// A PeakEWMA load must be below this fraction of the other's to count as lower.
const PEAK_EWMA_MARGIN: f64 = 0.9;

/// Draws of the second endpoint in proportion to weight before the uniform fallback.
const WEIGHTED_DRAWS: usize = 4;

enum Sampler {
    /// All weights equal.
    Uniform,
    Weighted {
        alias: AliasTable,
        /// Per endpoint, `w_min / w`: multiplying the in-flight count by it and rounding down
        /// gives the in-flight count per copy of the lightest endpoint.
        per_copy: Box<[f64]>,
    },
}

impl Sampler {
    /// Draws in proportion to `weights`.
    fn weighted(weights: &[u32]) -> Self {
        let min = weights.iter().copied().min().unwrap_or(1);
        // The factor absorbs float rounding, so that an exact whole number of requests per
        // copy (3 in flight at weight 3 × w_min) is not rounded down to one less.
        let per_copy = weights
            .iter()
            .map(|&w| f64::from(min) / f64::from(w) * (1.0 + 1e-12))
            .collect();
        Sampler::Weighted {
            alias: AliasTable::new(weights),
            per_copy,
        }
    }
}

impl PowerOfTwoChoicesPicker {
    /// The two endpoints compared for one pick: distinct, the first drawn in proportion to
    /// weight. `n` is at least 2.
    #[inline]
    pub(crate) fn sample(&self, n: usize, cx: &mut PickContext<'_>) -> (usize, usize) {
        match &self.sampler {
            Sampler::Weighted { alias, .. } if alias.len() == n => {
                let draw = |cx: &mut PickContext<'_>| alias.draw(cx.random());
                let first = draw(cx);
                if n == 2 {
                    return (first, 1 - first);
                }
                for _ in 0..WEIGHTED_DRAWS {
                    let second = draw(cx);
                    if second != first {
                        return (first, second);
                    }
                }
                let other = cx.random_below(n - 1);
                (first, other + usize::from(other >= first))
            }
            // Equal weights (or, defensively, a table of another size): both uniform, from
            // one random number.
            _ => {
                let (first, rest) = split(cx.random(), n);
                let (other, _) = split(rest, n - 1);
                (first, other + usize::from(other >= first))
            }
        }
    }

    /// Requests in flight to endpoint `index`, per copy of the lightest endpoint.
    #[inline]
    fn in_flight(&self, index: usize, endpoint: &Endpoint<'_>) -> u64 {
        let in_flight = endpoint.in_flight();
        match &self.sampler {
            Sampler::Weighted { per_copy, .. } => match per_copy.get(index) {
                // `as` rounds toward zero: down, for these non-negative values.
                // In-flight counts fit in 32 bits; signed conversions are single instructions.
                Some(&scale) => (in_flight as i64 as f64 * scale) as i64 as u64,
                None => in_flight,
            },
            Sampler::Uniform => in_flight,
        }
    }

    /// The PeakEWMA cost of sending the request to endpoint `index`.
    #[inline]
    fn cost(&self, index: usize, endpoint: &Endpoint<'_>, now: u64) -> f64 {
        let PickerLoad::PeakEwma {
            decay,
            default_rtt_ns,
            resolution_ns,
        } = self.load
        else {
            return self.in_flight(index, endpoint) as f64;
        };
        let in_flight = self.in_flight(index, endpoint) as f64;
        match endpoint.latency_estimate(now, decay) {
            Some(estimate) => estimate.max(resolution_ns) * (in_flight + 1.0),
            // Not measured yet: free while idle, so it is probed.
            None => default_rtt_ns * in_flight,
        }
    }

    /// Whether a failing endpoint sits this comparison out: with probability
    /// 1 - 1 / (1 + penalty × failures in a row).
    #[inline]
    fn sits_out(&self, endpoint: &Endpoint<'_>, cx: &mut PickContext<'_>) -> bool {
        let failures = endpoint.consecutive_failures();
        if failures == 0 || self.error_penalty == 0.0 {
            return false;
        }
        let uniform = (cx.random() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        uniform * (1.0 + self.error_penalty * f64::from(failures)) >= 1.0
    }

    /// Whether `second` takes the request from `first`.
    #[inline]
    fn second_wins(
        &self,
        (first, a): (usize, Endpoint<'_>),
        (second, b): (usize, Endpoint<'_>),
        cx: &mut PickContext<'_>,
    ) -> bool {
        let (out_a, out_b) = (self.sits_out(&a, cx), self.sits_out(&b, cx));
        if out_a != out_b {
            return out_a;
        }
        match self.load {
            PickerLoad::InFlight => self.in_flight(second, &b) < self.in_flight(first, &a),
            PickerLoad::PeakEwma {
                resolution_ns,
                default_rtt_ns,
                ..
            } => {
                // `second` wins only by at least the resolution, and a measured endpoint's
                // cost is never below the resolution; estimates only decay between updates, so
                // the last one bounds `first`'s cost. Fast endpoints at low load (the usual
                // case) are settled without decaying an estimate.
                let least_second = match b.latency_undecayed() {
                    Some(_) => resolution_ns,
                    None => default_rtt_ns * self.in_flight(second, &b) as f64,
                };
                let in_flight = self.in_flight(first, &a) as f64;
                let most_first = match a.latency_undecayed() {
                    Some(last) => last.max(resolution_ns) * (in_flight + 1.0),
                    None => default_rtt_ns * in_flight,
                };
                // The difference, not a sum: rounding is monotonic in each operand, so this
                // agrees with the full comparison below to the last bit.
                if most_first - least_second < resolution_ns {
                    return false;
                }
                let now = cx.now();
                let (to_beat, cost) = (self.cost(first, &a, now), self.cost(second, &b, now));
                // Lower by the margin, and by at least the resolution: a difference finer
                // than it is noise too.
                cost < to_beat * PEAK_EWMA_MARGIN && to_beat - cost >= resolution_ns
            }
        }
    }
}

impl Picker for PowerOfTwoChoicesPicker {
    type Local = ();

    #[inline]
    fn pick(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        let n = endpoints.len();
        if n < 2 {
            return (n == 1).then_some(0);
        }
        let (first, second) = self.sample(n, cx);
        let a = (first, endpoints.get(first));
        let b = (second, endpoints.get(second));
        Some(if self.second_wins(a, b, cx) {
            second
        } else {
            first
        })
    }

    fn latency_decay(&self) -> Option<Duration> {
        match self.load {
            PickerLoad::InFlight => None,
            PickerLoad::PeakEwma { decay, .. } => Some(decay),
        }
    }
}

impl fmt::Debug for PowerOfTwoChoicesPicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (load, decay) = match self.load {
            PickerLoad::InFlight => ("in flight", None),
            PickerLoad::PeakEwma { decay, .. } => ("PeakEWMA", Some(decay)),
        };
        f.debug_struct("PowerOfTwoChoicesPicker")
            .field("load", &load)
            .field("decay", &decay)
            .field(
                "weighted",
                &matches!(self.sampler, Sampler::Weighted { .. }),
            )
            .field("error_penalty", &self.error_penalty)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{
        any, prop, prop_assert, prop_assert_eq, prop_assert_ne, prop_oneof, proptest,
        ProptestConfig,
    };
    use proptest::strategy::Strategy as _;

    use super::*;
    use crate::endpoint::{EndpointHandle, InFlightGuard};
    use crate::strategy::test_util::{endpoints, picks};
    use crate::strategy::LocalState;

    fn build(strategy: &PowerOfTwoChoices, handles: &[EndpointHandle]) -> PowerOfTwoChoicesPicker {
        strategy.build(&Endpoints::new(handles))
    }

    /// Holds `count` requests in flight to `handle`.
    fn hold(handle: &EndpointHandle, count: usize) -> Vec<InFlightGuard> {
        (0..count).map(|_| handle.dispatch()).collect()
    }

    /// Picks `n` times at time `now`; returns how often each endpoint was chosen.
    fn counts_at(
        picker: &PowerOfTwoChoicesPicker,
        handles: &[EndpointHandle],
        n: usize,
        now: u64,
    ) -> Vec<usize> {
        let mut local = LocalState::new();
        let endpoints = Endpoints::new(handles);
        let mut counts = vec![0; handles.len()];
        for _ in 0..n {
            let mut unit = ();
            let mut cx = PickContext::new(&mut local, &mut unit);
            cx.now = now;
            counts[picker.pick(&endpoints, &mut cx).expect("a choice")] += 1;
        }
        counts
    }

    fn counts(
        picker: &PowerOfTwoChoicesPicker,
        handles: &[EndpointHandle],
        n: usize,
    ) -> Vec<usize> {
        counts_at(picker, handles, n, 0)
    }

    fn weights() -> impl proptest::strategy::Strategy<Value = Vec<u32>> {
        prop_oneof![
            (2usize..70).prop_map(|n| vec![1; n]),
            prop::collection::vec(1u32..=1000, 2..70),
            // One dominant weight exercises the fallback of the second draw.
            (2usize..70).prop_map(|n| {
                let mut w = vec![1; n];
                w[n / 2] = 1_000_000;
                w
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// The shortcut of a PeakEWMA comparison (a bound on the first candidate's cost that
        /// the second cannot beat by the resolution) gives the verdict the two full costs give.
        #[test]
        fn the_peak_ewma_shortcut_agrees_with_the_full_comparison(
            // Latencies as multiples of the resolution, around the boundaries that matter.
            rtts in prop::collection::vec(prop::option::of(0.01f64..4.0), 2),
            in_flight in prop::collection::vec(0usize..4, 2),
            resolution_us in 1u64..5_000,
            later_ms in 0u64..3_000,
        ) {
            let handles = endpoints(&[1, 1]);
            let strategy = PowerOfTwoChoices::peak_ewma()
                .latency_resolution(Duration::from_micros(resolution_us))
                .unwrap();
            let picker = build(&strategy, &handles);
            let PickerLoad::PeakEwma { resolution_ns, .. } = picker.load else {
                unreachable!("a PeakEWMA picker");
            };
            let decay_ns = PowerOfTwoChoices::DEFAULT_DECAY.as_nanos() as f64;
            let at = 1_000_000_000;
            for (handle, rtt) in handles.iter().zip(&rtts) {
                if let Some(rtt) = rtt {
                    handle.dispatch().record_rtt(rtt * resolution_ns, at, decay_ns);
                }
            }
            let _held: Vec<_> = handles.iter().zip(&in_flight).map(|(h, &n)| hold(h, n)).collect();
            let now = at + later_ms * 1_000_000;
            let endpoints = Endpoints::new(&handles);
            let (a, b) = (endpoints.get(0), endpoints.get(1));
            let (to_beat, cost) = (picker.cost(0, &a, now), picker.cost(1, &b, now));
            let full = cost < to_beat * PEAK_EWMA_MARGIN && to_beat - cost >= resolution_ns;
            let mut local = LocalState::new();
            let mut unit = ();
            let mut cx = PickContext::new(&mut local, &mut unit);
            cx.now = now;
            prop_assert_eq!(picker.second_wins((0, a), (1, b), &mut cx), full);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The two endpoints compared are never the same one.
        #[test]
        fn the_two_samples_are_distinct_and_in_range(weights in weights()) {
            let handles = endpoints(&weights);
            let picker = build(&PowerOfTwoChoices::new(), &handles);
            let mut local = LocalState::new();
            for _ in 0..2_000 {
                let mut unit = ();
                let mut cx = PickContext::new(&mut local, &mut unit);
                let (a, b) = picker.sample(weights.len(), &mut cx);
                prop_assert!(a < weights.len() && b < weights.len());
                prop_assert_ne!(a, b);
            }
        }

        /// Observable through picks: an endpoint busier than every other (per weight) is
        /// never chosen, as it would be whenever it were drawn twice.
        #[test]
        fn the_busiest_endpoint_is_never_picked(
            weights in weights(),
            busiest in any::<prop::sample::Index>(),
            peak_ewma in any::<bool>(),
        ) {
            let handles = endpoints(&weights);
            let busiest = busiest.index(weights.len());
            let min = *weights.iter().min().unwrap();
            // Two requests per copy of the lightest endpoint: busier than any idle endpoint.
            let _held = hold(&handles[busiest], 2 * (weights[busiest] / min) as usize);
            let strategy = if peak_ewma { PowerOfTwoChoices::peak_ewma() } else { PowerOfTwoChoices::new() };
            let picker = build(&strategy, &handles);
            let chosen = counts(&picker, &handles, 2_000);
            prop_assert_eq!(chosen[busiest], 0, "{:?}", chosen);
        }

    }

    #[test]
    fn one_endpoint_is_always_picked() {
        let handles = endpoints(&[3]);
        for strategy in [PowerOfTwoChoices::new(), PowerOfTwoChoices::peak_ewma()] {
            let picker = build(&strategy, &handles);
            assert!(picks(&picker, &handles, 10).iter().all(|&i| i == 0));
        }
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let handles = endpoints(&[1, 1]);
        let _held = hold(&handles[0], 1);
        let picker = build(&PowerOfTwoChoices::new(), &handles);
        assert_eq!(counts(&picker, &handles, 100), vec![0, 100]);
    }

    #[test]
    fn ties_are_shared_evenly_not_in_table_order() {
        let handles = endpoints(&[1; 8]);
        for strategy in [PowerOfTwoChoices::new(), PowerOfTwoChoices::peak_ewma()] {
            let picker = build(&strategy, &handles);
            let chosen = counts(&picker, &handles, 80_000);
            let (min, max) = (chosen.iter().min().unwrap(), chosen.iter().max().unwrap());
            assert!(*max as f64 / *min as f64 <= 1.1, "{chosen:?}");
        }
    }

    #[test]
    fn weights_99_to_1_give_99_to_1_at_equal_load() {
        let handles = endpoints(&[99, 1]);
        for strategy in [PowerOfTwoChoices::new(), PowerOfTwoChoices::peak_ewma()] {
            let picker = build(&strategy, &handles);
            let light = counts(&picker, &handles, 100_000)[1];
            // 1000 expected, standard deviation about 31.
            assert!((850..=1150).contains(&light), "{light}");
        }
    }

    #[test]
    fn weights_share_evenly_among_equally_light_endpoints() {
        // With one dominant weight nearly every second draw falls back to a uniform one.
        let handles = endpoints(&[1000, 1, 1, 1, 1]);
        let _held = hold(&handles[0], 10_000);
        let picker = build(&PowerOfTwoChoices::new(), &handles);
        let chosen = counts(&picker, &handles, 40_000);
        let light = &chosen[1..];
        let (min, max) = (light.iter().min().unwrap(), light.iter().max().unwrap());
        assert!(*max as f64 / *min as f64 <= 1.15, "{chosen:?}");
    }

    #[test]
    fn a_heavy_endpoint_counts_per_copy_of_the_lightest() {
        let handles = endpoints(&[6, 2]);
        let picker = build(&PowerOfTwoChoices::new(), &handles);
        // Three copies of the light endpoint: 5 in flight is 1 per copy (rounded down), no
        // busier than the light endpoint with 1; 6 in flight is 2 per copy, busier.
        let mut heavy = hold(&handles[0], 5);
        let _light = hold(&handles[1], 1);
        let tied = counts(&picker, &handles, 40_000);
        assert!(
            (9_000..11_000).contains(&tied[1]),
            "shares follow weights: {tied:?}"
        );
        heavy.push(handles[0].dispatch());
        assert_eq!(counts(&picker, &handles, 1_000), vec![0, 1_000]);
    }

    #[test]
    fn a_failing_endpoint_gets_at_most_its_fair_share_and_can_recover() {
        let handles = endpoints(&[1; 5]);
        // The healthy endpoints are busy; the failing one looks idle.
        let _held: Vec<_> = handles[1..].iter().flat_map(|h| hold(h, 3)).collect();
        let failed = handles[0].dispatch();
        for _ in 0..3 {
            failed.record_failure();
        }
        drop(failed);
        let picker = build(&PowerOfTwoChoices::new(), &handles);
        // Drawn into 40% of the comparisons, it takes part in 1 / (1 + 3) of them: 10%.
        let share = counts(&picker, &handles, 50_000)[0] as f64 / 50_000.0;
        assert!((0.08..0.12).contains(&share), "{share}");

        let off = build(
            &PowerOfTwoChoices::new().error_penalty(0.0).unwrap(),
            &handles,
        );
        let share = counts(&off, &handles, 50_000)[0] as f64 / 50_000.0;
        assert!(
            share > 0.38,
            "without the penalty it wins every comparison: {share}"
        );

        handles[0].dispatch().record_success();
        let share = counts(&picker, &handles, 50_000)[0] as f64 / 50_000.0;
        assert!(share > 0.38, "one success ends the penalty: {share}");
    }

    #[test]
    fn peak_ewma_prefers_the_lower_cost() {
        let decay = PowerOfTwoChoices::DEFAULT_DECAY;
        let handles = endpoints(&[1, 1]);
        let picker = build(&PowerOfTwoChoices::peak_ewma(), &handles);
        assert_eq!(picker.latency_decay(), Some(decay));
        let now = 1_000_000_000;
        let decay_ns = decay.as_nanos() as f64;
        handles[0].dispatch().record_rtt(10e6, now, decay_ns);
        handles[1].dispatch().record_rtt(95e6, now, decay_ns);
        assert_eq!(counts_at(&picker, &handles, 100, now), vec![100, 0]);
        // 10 ms × (8 + 1) in flight against 95 ms idle: within 10%, so a tie.
        let _held = hold(&handles[0], 8);
        let tied = counts_at(&picker, &handles, 10_000, now);
        assert!((4_500..5_500).contains(&tied[0]), "{tied:?}");
        // 10 ms × (12 + 1) is clearly more.
        let _more = hold(&handles[0], 4);
        assert_eq!(counts_at(&picker, &handles, 100, now), vec![0, 100]);
    }

    #[test]
    fn peak_ewma_probes_an_endpoint_without_a_measurement_one_request_at_a_time() {
        let decay_ns = PowerOfTwoChoices::DEFAULT_DECAY.as_nanos() as f64;
        let handles = endpoints(&[1, 1]);
        let picker = build(&PowerOfTwoChoices::peak_ewma(), &handles);
        let now = 1_000_000_000;
        handles[0].dispatch().record_rtt(1e6, now, decay_ns);
        // Idle and unmeasured: free, so it is tried at once.
        assert_eq!(counts_at(&picker, &handles, 10, now), vec![0, 10]);
        // With a probe in flight it costs the default 30 ms: a 1 ms endpoint is preferred
        // until it has 30 requests in flight.
        let _probe = hold(&handles[1], 1);
        assert_eq!(counts_at(&picker, &handles, 10, now), vec![10, 0]);
        let _held = hold(&handles[0], 40);
        assert_eq!(counts_at(&picker, &handles, 10, now), vec![0, 10]);
    }

    #[test]
    fn invalid_configuration_is_rejected_with_a_reason() {
        let err = PowerOfTwoChoices::peak_ewma()
            .decay(Duration::ZERO)
            .unwrap_err();
        assert_eq!(err.setting(), "decay");
        assert!(err.to_string().contains("greater than zero"), "{err}");
        let err = PowerOfTwoChoices::peak_ewma()
            .default_rtt(Duration::ZERO)
            .unwrap_err();
        assert_eq!(err.setting(), "default_rtt");
        let err = PowerOfTwoChoices::new()
            .decay(Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("peak_ewma()"), "{err}");
        let err = PowerOfTwoChoices::peak_ewma()
            .latency_resolution(Duration::ZERO)
            .unwrap_err();
        assert_eq!(err.setting(), "latency_resolution");
        let err = PowerOfTwoChoices::new()
            .latency_resolution(Duration::from_micros(10))
            .unwrap_err();
        assert!(err.to_string().contains("peak_ewma()"), "{err}");
        assert!(PowerOfTwoChoices::peak_ewma()
            .latency_resolution(Duration::from_nanos(1))
            .is_ok());
        for penalty in [-1.0, f64::NAN, f64::INFINITY] {
            let err = PowerOfTwoChoices::new().error_penalty(penalty).unwrap_err();
            assert_eq!(err.setting(), "error_penalty");
        }
        assert!(PowerOfTwoChoices::new().error_penalty(0.0).is_ok());
    }
}
