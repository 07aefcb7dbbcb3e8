//! Reading what a health check knows about its endpoints, from anywhere.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::probe::ProbeError;

/// One candidate endpoint's health as its probes left it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EndpointHealth {
    /// Whether it is healthy, i.e. inserted into the balancer.
    pub healthy: bool,
    /// Probes that succeeded in a row, up to the latest (0 if the latest failed).
    pub consecutive_successes: u32,
    /// Probes that failed in a row, up to the latest (0 if the latest succeeded).
    pub consecutive_failures: u32,
    /// Probes finished since the endpoint was discovered.
    pub probes: u64,
    /// The error of the most recent failed probe; kept after later successes.
    pub last_error: Option<ProbeError>,
}

impl EndpointHealth {
    pub(super) fn initial(healthy: bool) -> Self {
        Self {
            healthy,
            consecutive_successes: 0,
            consecutive_failures: 0,
            probes: 0,
            last_error: None,
        }
    }
}

/// A handle on a [`HealthCheck`](super::HealthCheck)'s view of its candidate endpoints, from
/// [`HealthCheck::status`](super::HealthCheck::status). Cheap to clone; it stays readable
/// after the health check is gone (showing its last view).
pub struct HealthStatus<K> {
    endpoints: Arc<Mutex<HashMap<K, EndpointHealth>>>,
}

impl<K> HealthStatus<K> {
    pub(super) fn new() -> Self {
        Self {
            endpoints: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K: Hash + Eq> HealthStatus<K> {
    /// The health of the candidate `key`, if the source has it.
    pub fn get(&self, key: &K) -> Option<EndpointHealth> {
        lock(&self.endpoints).get(key).cloned()
    }

    /// Every candidate and its health, in no particular order.
    pub fn all(&self) -> Vec<(K, EndpointHealth)>
    where
        K: Clone,
    {
        lock(&self.endpoints)
            .iter()
            .map(|(key, health)| (key.clone(), health.clone()))
            .collect()
    }

    /// How many candidates are healthy.
    pub fn healthy(&self) -> usize {
        lock(&self.endpoints)
            .values()
            .filter(|health| health.healthy)
            .count()
    }

    pub(super) fn set(&self, key: K, health: &EndpointHealth) {
        lock(&self.endpoints).insert(key, health.clone());
    }

    pub(super) fn remove(&self, key: &K) {
        lock(&self.endpoints).remove(key);
    }
}

/// Locks the map, ignoring poisoning: every critical section here is a single map operation,
/// so a panic elsewhere cannot leave it half-updated. (Plain `std` locking: this map is not one
/// of the lock-free parts `crate::sync` swaps for loom's.)
fn lock<K>(
    endpoints: &Mutex<HashMap<K, EndpointHealth>>,
) -> MutexGuard<'_, HashMap<K, EndpointHealth>> {
    endpoints.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K> Clone for HealthStatus<K> {
    fn clone(&self) -> Self {
        Self {
            endpoints: self.endpoints.clone(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for HealthStatus<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(lock(&self.endpoints).iter()).finish()
    }
}
