//! The panic threshold: when too few endpoints are available, use them all.

/// Whether the balancer is in panic mode: fewer than `threshold` (a share, 0–1) of the
/// `usable` endpoints are `available` (not ejected), so ejected ones are picked too rather
/// than overload the survivors. A threshold of 0 never panics; no usable endpoint is not a
/// panic (there is nothing to fall back on).
pub(crate) fn panicking(threshold: f64, usable: usize, available: usize) -> bool {
    threshold > 0.0 && usable > 0 && (available as f64) < threshold * usable as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_below_the_share_of_available_endpoints() {
        assert!(!panicking(0.5, 10, 5));
        assert!(panicking(0.5, 10, 4));
        assert!(!panicking(0.0, 10, 0), "0 disables it");
        assert!(!panicking(0.5, 0, 0), "nothing to fall back on");
        assert!(panicking(1.0, 3, 2));
    }
}
