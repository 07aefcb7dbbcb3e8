//! Request keys for keyed strategies.
//!
//! A keyed strategy (consistent hashing) maps a request to an endpoint by a hash of something
//! in the request. The balancer computes that hash with its [`RequestKey`], set with
//! [`BalanceLayer::key`](crate::BalanceLayer::key), and passes it to the strategy's picker.
//! Unkeyed strategies never call it.

/// Extracts a key hash from a request.
///
/// Any `Fn(&Req) -> Option<u64>` closure is a `RequestKey`:
///
/// ```
/// use tower_lb::{BalanceLayer, RoundRobin};
///
/// let layer = BalanceLayer::new(RoundRobin::new())
///     .key(|request: &String| Some(request.len() as u64));
/// # let _ = layer;
/// ```
pub trait RequestKey<Req>: Send + Sync + 'static {
    /// The request's key hash, or `None` when the request carries no key (the strategy then
    /// applies its documented fallback).
    fn key_hash(&self, request: &Req) -> Option<u64>;
}

/// No request key: the default, for strategies that ignore the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKey;

impl<Req> RequestKey<Req> for NoKey {
    #[inline]
    fn key_hash(&self, _: &Req) -> Option<u64> {
        None
    }
}

impl<Req, F> RequestKey<Req> for F
where
    F: Fn(&Req) -> Option<u64> + Send + Sync + 'static,
{
    fn key_hash(&self, request: &Req) -> Option<u64> {
        self(request)
    }
}
