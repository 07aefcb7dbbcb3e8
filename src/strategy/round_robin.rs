//! Round-robin: each endpoint in turn.

use super::{Endpoints, PickContext, Picker, Strategy};

/// Sends requests to each endpoint in turn, ignoring weights and load.
///
/// Each clone of the balancer rotates with its own cursor, so clones on different threads
/// never contend on a shared counter. A new clone starts one step after the previous clone's
/// start (from a random position per balancer), so a server that clones the balancer for
/// every request still rotates exactly, and long-lived clones start spread out. Over any run of `n` picks a clone visits each of `n` ready endpoints once;
/// an endpoint that is not ready is skipped for the next one in the rotation.
///
/// Pick cost: O(1), no atomic operation.
///
/// ```
/// use tower_lb::{strategy::RoundRobin, BalanceLayer};
/// let layer = BalanceLayer::new(RoundRobin::default());
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobin {
    _priv: (),
}

impl RoundRobin {
    /// Round-robin over the discovered endpoints.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The picker [`RoundRobin`] builds; it holds no state of its own.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobinPicker {
    _priv: (),
}

impl Strategy for RoundRobin {
    type Picker = RoundRobinPicker;

    fn build(&self, _: &Endpoints<'_>) -> RoundRobinPicker {
        RoundRobinPicker::default()
    }
}

impl Picker for RoundRobinPicker {
    type Local = ();

    #[inline]
    fn pick(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        let n = endpoints.len() as u64;
        let cursor = cx.cursor();
        let mut next = cursor.wrapping_add(1);
        // The cursor stays below `n` after the first pick, so this divides only on a clone's
        // first pick (it starts at a random value) or after the table shrank.
        if next >= n {
            next %= n;
        }
        *cursor = next;
        Some(next as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::test_util::{endpoints, picks};

    #[test]
    fn visits_every_endpoint_once_per_cycle() {
        let handles = endpoints(&[1, 5, 1, 1]);
        let picker = RoundRobin::new().build(&Endpoints::new(&handles));
        let chosen = picks(&picker, &handles, 40);
        for cycle in chosen.chunks(4) {
            let mut sorted = cycle.to_vec();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                vec![0, 1, 2, 3],
                "weights are ignored, order rotates"
            );
        }
        assert!(chosen.windows(2).all(|w| w[1] == (w[0] + 1) % 4));
    }
}
