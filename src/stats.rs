//! A point-in-time view of the balancer's endpoints and counters.

/// What the balancer knows about its endpoints, taken by [`Balance::stats`].
///
/// Each counter is read atomically, but a snapshot taken under load is not one atomic view of
/// all of them. After every request has finished or been dropped, every `in_flight` is zero.
///
/// [`Balance::stats`]: crate::Balance::stats
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Stats<K> {
    /// Every endpoint, active ones first in table order, then removed ones that still have
    /// requests in flight or may still receive one already reserved.
    pub endpoints: Vec<EndpointStats<K>>,
    /// Picks of removed endpoints that are no longer listed (drained and unreachable).
    pub removed_picks: u64,
    /// Failures of removed endpoints that are no longer listed.
    pub removed_failures: u64,
    /// Errors the discovery stream has yielded so far (the last endpoint set was kept).
    pub discovery_errors: u64,
    /// Whether the discovery stream has ended (the last endpoint set is kept).
    pub discovery_ended: bool,
    /// Set when the balancer's discovery task failed (it panicked: in a discovery stream, a
    /// weigher, a strategy's build…), with the panic's message. Every request then fails with
    /// [`Error::DiscoveryFailed`](crate::Error::DiscoveryFailed).
    pub discovery_failure: Option<String>,
    /// Whether too few endpoints are available, so ejected ones are picked too (see
    /// [`health`](crate::health)).
    pub panic_mode: bool,
}

impl<K> Stats<K> {
    /// Endpoints that can receive new requests (active or slow-starting).
    pub fn available(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| matches!(e.status, EndpointStatus::Active | EndpointStatus::SlowStart))
            .count()
    }

    /// The stats of the endpoint with this key that can receive requests, if any, else of a
    /// removed one that is still draining.
    pub fn get(&self, key: &K) -> Option<&EndpointStats<K>>
    where
        K: PartialEq,
    {
        self.endpoints.iter().find(|e| &e.key == key)
    }

    /// The sum of all endpoints' in-flight counts.
    pub fn in_flight(&self) -> u64 {
        self.endpoints.iter().map(|e| e.in_flight).sum()
    }

    /// Every request ever dispatched: the listed endpoints' picks plus
    /// [`removed_picks`](Self::removed_picks).
    pub fn picks(&self) -> u64 {
        self.endpoints.iter().map(|e| e.picks).sum::<u64>() + self.removed_picks
    }
}

/// One endpoint's counters and state.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats<K> {
    /// The discovery key.
    pub key: K,
    /// Requests in flight to it now, from every clone of the balancer.
    pub in_flight: u64,
    /// Requests dispatched to it since it was inserted.
    pub picks: u64,
    /// Requests that failed, plus failed readiness checks.
    pub failures: u64,
    /// Responses that failed in a row, up to now.
    pub consecutive_failures: u32,
    /// Its weight, as discovery or a handle set it.
    pub weight: u32,
    /// The weight strategies use now: lower while slow-starting (scaled by 100 while any
    /// endpoint slow-starts).
    pub effective_weight: u32,
    /// Times outlier detection has ejected it since its count last started over.
    pub ejections: u32,
    /// Whether it takes new requests.
    pub status: EndpointStatus,
}

/// Whether an endpoint takes new requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointStatus {
    /// In the table and picked.
    Active,
    /// Its service failed a readiness check; out of rotation until discovery inserts it again.
    Broken,
    /// Ejected by outlier detection; back on its own when the ejection ends.
    Ejected,
    /// Taking a growing share of traffic after being added or coming back.
    SlowStart,
    /// Being drained: no new requests; removed once its in-flight requests finish.
    Draining,
    /// Removed by discovery; shown while requests to it are still in flight.
    Removed,
}
