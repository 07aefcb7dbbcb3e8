//! Endpoint weights.
//!
//! Every endpoint has a weight, 1 unless discovery or a [`BalanceHandle`] says otherwise.
//! Weight-aware strategies (weighted round-robin, weighted least-connections, weighted
//! random and P2C) give an endpoint a share of traffic proportional to its weight; the others
//! ignore it.
//!
//! **Weight 0 is not a weight**: it is rejected with a [`ConfigError`]. To stop sending new
//! requests to an endpoint, remove it (its in-flight requests finish) — a weight of zero would
//! leave a member that can never be picked and muddle every proportional strategy.
//!
//! Weights reach the balancer in one of two ways:
//!
//! - **From discovery**: insert [`Weighted`] services and build the balancer with
//!   [`BalanceLayer::weighted`](crate::BalanceLayer::weighted) (or any [`Weigh`] function of
//!   the key and service, with [`BalanceLayer::weigh_with`](crate::BalanceLayer::weigh_with)).
//!   An `Insert` of a known key applies its weight too.
//! - **At run time**: [`BalanceHandle::set_weight`]. Counters are kept; the strategy's picker
//!   is rebuilt off the request path.
//!
//! [`BalanceHandle`]: crate::BalanceHandle
//! [`BalanceHandle::set_weight`]: crate::BalanceHandle::set_weight
//!
//! ```
//! use tower::{service_fn, Layer};
//! use tower_lb::{discover, strategy::RoundRobin, weight::{Weight, Weighted}, BalanceLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let backend = |name: &'static str| service_fn(move |_: ()| async move {
//!     Ok::<_, std::convert::Infallible>(name)
//! });
//! let endpoints = [
//!     ("big", Weighted::new(backend("big"), Weight::new(3).unwrap())),
//!     ("small", Weighted::new(backend("small"), Weight::ONE)),
//! ];
//! let balance = BalanceLayer::new(RoundRobin::new()).weighted().layer(discover::fixed(endpoints));
//! assert_eq!(balance.stats().get(&"big").unwrap().weight, 3);
//! # }
//! ```

use std::fmt;

use crate::error::ConfigError;

/// A validated endpoint weight: from 1 to [`Weight::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Weight(u32);

impl Weight {
    /// The default weight.
    pub const ONE: Weight = Weight(1);
    /// The largest weight: a million, far above any real capacity ratio and low enough that
    /// sums over thousands of endpoints never overflow.
    pub const MAX: Weight = Weight(1_000_000);

    /// A weight; 0 and values above [`Weight::MAX`] are rejected.
    pub fn new(weight: u32) -> Result<Self, ConfigError> {
        if weight == 0 {
            return Err(ConfigError::new(
                "weight",
                "0 is not a weight; remove the endpoint to stop sending it requests",
            ));
        }
        if weight > Self::MAX.0 {
            return Err(ConfigError::new(
                "weight",
                format!("{weight} is above the maximum of {}", Self::MAX.0),
            ));
        }
        Ok(Self(weight))
    }

    /// The weight as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Self::ONE
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl TryFrom<u32> for Weight {
    type Error = ConfigError;

    fn try_from(weight: u32) -> Result<Self, ConfigError> {
        Self::new(weight)
    }
}

/// An endpoint service with the weight discovery gave it.
///
/// The balancer takes the weight and keeps the inner service when the endpoint is inserted,
/// with [`BalanceLayer::weighted`](crate::BalanceLayer::weighted). `Weighted` is not a service
/// itself, so a balancer over `Weighted` services built without `.weighted()` — which would
/// give every endpoint weight 1 — does not compile.
#[derive(Clone, Debug)]
pub struct Weighted<S> {
    service: S,
    weight: Weight,
}

impl<S> Weighted<S> {
    /// `service` with `weight`.
    pub fn new(service: S, weight: Weight) -> Self {
        Self { service, weight }
    }

    /// The weight.
    pub fn weight(&self) -> Weight {
        self.weight
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.service
    }
}

/// Gives each inserted endpoint its weight, and the service the balancer keeps for it.
///
/// Any `Fn(&K, &S) -> Weight` is a `Weigh` that keeps the service as it is.
pub trait Weigh<K, S>: Send + 'static {
    /// The endpoint service the balancer keeps.
    type Service;

    /// The weight of the endpoint `key` served by `service`, and the service to keep.
    fn weigh(&self, key: &K, service: S) -> (Weight, Self::Service);
}

/// Every endpoint weighs 1: the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unweighted;

impl<K, S> Weigh<K, S> for Unweighted {
    type Service = S;

    fn weigh(&self, _: &K, service: S) -> (Weight, S) {
        (Weight::ONE, service)
    }
}

/// Takes the weight of [`Weighted`] services and keeps the inner service.
#[derive(Clone, Copy, Debug, Default)]
pub struct FromWeighted;

impl<K, S> Weigh<K, Weighted<S>> for FromWeighted {
    type Service = S;

    fn weigh(&self, _: &K, service: Weighted<S>) -> (Weight, S) {
        (service.weight, service.service)
    }
}

impl<K, S, F> Weigh<K, S> for F
where
    F: Fn(&K, &S) -> Weight + Send + 'static,
{
    type Service = S;

    fn weigh(&self, key: &K, service: S) -> (Weight, S) {
        (self(key, &service), service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_oversized_weights_are_rejected_with_a_reason() {
        let zero = Weight::new(0).unwrap_err();
        assert_eq!(zero.setting(), "weight");
        assert!(zero.to_string().contains("remove the endpoint"), "{zero}");
        assert!(Weight::new(1_000_001)
            .unwrap_err()
            .to_string()
            .contains("maximum"));
        assert_eq!(Weight::new(7).unwrap().get(), 7);
        assert_eq!(Weight::try_from(1).unwrap(), Weight::ONE);
    }
}
