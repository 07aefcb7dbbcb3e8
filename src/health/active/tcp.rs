//! Probing an endpoint by opening a TCP connection to it.

use std::fmt;
use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::probe::{BoxProbeFuture, Probe, ProbeError};

/// A probe that connects to the endpoint's address over TCP and closes the connection at
/// once: healthy if the connection is accepted.
///
/// The address is the discovery key ([`TcpProbe::new`]) or a function of it
/// ([`TcpProbe::with_address`]).
///
/// ```
/// use std::net::SocketAddr;
/// use tower_lb::{discover, health::{HealthCheck, TcpProbe}};
///
/// // Keys are the addresses.
/// let addr: SocketAddr = "127.0.0.1:6379".parse().unwrap();
/// let checked = HealthCheck::new(discover::fixed([(addr, ())]), TcpProbe::new());
///
/// // Keys are names; a function finds the address.
/// let probe = TcpProbe::with_address(|name: &&str| match *name {
///     "primary" => SocketAddr::from(([10, 0, 0, 1], 6379)),
///     _ => SocketAddr::from(([10, 0, 0, 2], 6379)),
/// });
/// let named = HealthCheck::new(discover::fixed([("primary", ()), ("replica", ())]), probe);
/// # let _ = (checked, named);
/// ```
#[derive(Clone, Copy)]
pub struct TcpProbe<A = fn(&SocketAddr) -> SocketAddr> {
    address_of: A,
}

impl TcpProbe {
    /// Connects to the discovery key, which is the endpoint's address.
    pub fn new() -> Self {
        Self {
            address_of: |addr| *addr,
        }
    }

    /// Connects to `address_of(key)`.
    pub fn with_address<K, A>(address_of: A) -> TcpProbe<A>
    where
        A: Fn(&K) -> SocketAddr,
    {
        TcpProbe { address_of }
    }
}

impl Default for TcpProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl<A> fmt::Debug for TcpProbe<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProbe").finish_non_exhaustive()
    }
}

impl<K, S, A> Probe<K, S> for TcpProbe<A>
where
    A: Fn(&K) -> SocketAddr,
{
    type Future = BoxProbeFuture;

    fn probe(&mut self, key: &K, _: &S) -> BoxProbeFuture {
        let addr = (self.address_of)(key);
        Box::pin(async move {
            TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(ProbeError::new)
        })
    }
}
