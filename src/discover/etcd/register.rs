//! [`register`]: a server's own entry under its service's prefix, held by a lease.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::backoff::Backoff;
use super::error::EtcdError;
use super::value::{self, Registered};
use super::watch::{
    service_prefix, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN, DEFAULT_REQUEST_TIMEOUT,
};
use crate::error::ConfigError;
use crate::weight::Weight;

/// The default lease time to live: a server that dies without deregistering is gone from
/// every watcher within this time.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Prepares the registration of `addr` (`host:port`) under `service`: the key
/// `<service>/<addr>` with gRPC-Go's naming value `{"Addr": "<addr>", "Metadata": null}`, as
/// `go.etcd.io/etcd/client/v3/naming/endpoints` writes it, so Go and Rust clients of the same
/// registry both find the server. [`Register::start`] writes it.
///
/// An empty service name and an address that is not `host:port` are rejected.
pub fn register(client: Client, service: &str, addr: &str) -> Result<Register, ConfigError> {
    let prefix = service_prefix(service)?;
    match value::parse(addr.as_bytes()) {
        Ok(Registered::Endpoint { .. }) if !addr.trim().starts_with('{') => {}
        Ok(_) => {
            return Err(ConfigError::new(
                "addr",
                format!("{addr:?} is not host:port"),
            ))
        }
        Err(problem) => return Err(ConfigError::new("addr", problem)),
    }
    let addr = addr.trim().to_owned();
    Ok(Register {
        client,
        key: format!("{prefix}{addr}"),
        addr,
        ttl: DEFAULT_TTL.as_secs() as i64,
        weight: None,
        request_timeout: DEFAULT_REQUEST_TIMEOUT,
    })
}

/// A registration to [`start`](Register::start); see [`register`].
pub struct Register {
    client: Client,
    key: String,
    addr: String,
    /// In seconds, as etcd's leases are.
    ttl: i64,
    weight: Option<Weight>,
    request_timeout: Duration,
}

impl Register {
    /// The lease's time to live: when the server stops renewing it (it crashed, or lost
    /// etcd), its entry is deleted after this long. Default: [`DEFAULT_TTL`] (10 s). etcd
    /// leases count whole seconds: zero and fractions of a second are rejected (etcd may also
    /// raise a TTL below its own minimum, 1.5 × its election timeout).
    pub fn ttl(mut self, ttl: Duration) -> Result<Self, ConfigError> {
        if ttl.as_secs() == 0 || ttl.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "ttl",
                format!("{ttl:?}: etcd leases are a whole number of seconds, at least 1"),
            ));
        }
        self.ttl = i64::try_from(ttl.as_secs())
            .map_err(|_| ConfigError::new("ttl", format!("{ttl:?} is too long")))?;
        Ok(self)
    }

    /// Registers the server with `weight`, in the value's metadata (`{"weight": n}`), which
    /// [`watch`](super::watch) reads.
    pub fn weight(mut self, weight: Weight) -> Self {
        self.weight = Some(weight);
        self
    }

    /// How long one request to etcd may take. Default: 10 s. Zero is rejected.
    pub fn request_timeout(mut self, request_timeout: Duration) -> Result<Self, ConfigError> {
        if request_timeout.is_zero() {
            return Err(ConfigError::new(
                "request_timeout",
                "zero would fail every request",
            ));
        }
        self.request_timeout = request_timeout;
        Ok(self)
    }

    /// The key it writes: `<service>/<addr>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn value(&self) -> String {
        let metadata = match self.weight {
            Some(weight) => serde_json::json!({ "weight": weight.get() }),
            None => serde_json::Value::Null,
        };
        serde_json::json!({ "Addr": self.addr, "Metadata": metadata }).to_string()
    }

    /// Grants a lease, writes the key under it, and keeps the lease alive from a task on the
    /// current tokio runtime until [`Registration::shutdown`] (or until the `Registration` is
    /// dropped, after which the lease expires).
    ///
    /// Fails if etcd cannot be reached within the request timeout: a server can then decide
    /// to retry or to run unregistered.
    pub async fn start(self) -> Result<Registration, EtcdError> {
        let value = self.value();
        let mut client = self.client;
        let lease = grant_and_put(
            &mut client,
            &self.key,
            &value,
            self.ttl,
            self.request_timeout,
        )
        .await?;
        tracing::info!(key = %self.key, lease, ttl = self.ttl, "registered in etcd");
        let lease = Arc::new(AtomicI64::new(lease));
        let holder = Holder {
            client: client.clone(),
            key: self.key.clone(),
            value,
            ttl: self.ttl,
            lease: Arc::clone(&lease),
            request_timeout: self.request_timeout,
            backoff: Backoff::new(DEFAULT_BACKOFF_MIN, DEFAULT_BACKOFF_MAX),
        };
        Ok(Registration {
            client,
            key: self.key,
            lease,
            request_timeout: self.request_timeout,
            task: tokio::spawn(holder.run()),
        })
    }
}

impl fmt::Debug for Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Register")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// A live registration: its lease is kept alive until [`shutdown`](Self::shutdown).
///
/// Dropping it without `shutdown` (or the process dying) stops the keep-alive: the entry
/// disappears when the lease expires, within its TTL.
pub struct Registration {
    client: Client,
    key: String,
    lease: Arc<AtomicI64>,
    request_timeout: Duration,
    task: JoinHandle<()>,
}

impl Registration {
    /// The registered key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current lease (a new one after the old one was lost and the entry written again).
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    /// Deregisters: stops the keep-alive and revokes the lease, which deletes the entry at
    /// once, so watchers stop sending new requests now rather than when the lease expires.
    /// Call it when the server starts shutting down, before it stops serving.
    pub async fn shutdown(mut self) -> Result<(), EtcdError> {
        self.task.abort();
        let lease = self.lease_id();
        let revoked = timeout(self.request_timeout, self.client.lease_revoke(lease)).await;
        let revoke_error = match revoked {
            Ok(Ok(_)) => {
                tracing::info!(key = %self.key, lease, "deregistered from etcd");
                return Ok(());
            }
            Ok(Err(error)) => EtcdError::request("revoke", error),
            Err(_) => EtcdError::timeout("revoke", self.request_timeout),
        };
        // The lease may be gone already (expired while etcd was unreachable); make sure the
        // key is.
        match timeout(
            self.request_timeout,
            self.client.delete(self.key.as_str(), None),
        )
        .await
        {
            Ok(Ok(_)) => {
                tracing::info!(key = %self.key, "deregistered from etcd");
                Ok(())
            }
            _ => Err(revoke_error),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("lease", &self.lease_id())
            .finish_non_exhaustive()
    }
}

/// Grants a lease and writes the key under it; returns the lease.
async fn grant_and_put(
    client: &mut Client,
    key: &str,
    value: &str,
    ttl: i64,
    request_timeout: Duration,
) -> Result<i64, EtcdError> {
    let lease = match timeout(request_timeout, client.lease_grant(ttl, None)).await {
        Ok(Ok(granted)) => granted.id(),
        Ok(Err(error)) => return Err(EtcdError::request("grant", error)),
        Err(_) => return Err(EtcdError::timeout("grant", request_timeout)),
    };
    let options = PutOptions::new().with_lease(lease);
    let put = match timeout(request_timeout, client.put(key, value, Some(options))).await {
        Ok(Ok(_)) => return Ok(lease),
        Ok(Err(error)) => EtcdError::request("put", error),
        Err(_) => EtcdError::timeout("put", request_timeout),
    };
    // Best effort: the lease would expire on its own.
    let _ = timeout(request_timeout, client.lease_revoke(lease)).await;
    Err(put)
}

/// The keep-alive task.
struct Holder {
    client: Client,
    key: String,
    value: String,
    ttl: i64,
    lease: Arc<AtomicI64>,
    request_timeout: Duration,
    backoff: Backoff,
}

/// Why a keep-alive session ended.
enum Ended {
    /// etcd no longer has the lease (it expired while unrenewed, or was revoked).
    LeaseGone,
    /// etcd could not be reached.
    Failed(EtcdError),
}

impl Holder {
    /// Runs until aborted: keeps the lease alive, and when it is lost writes the entry again
    /// under a new one. Every failure is logged and retried after a backoff.
    async fn run(mut self) {
        loop {
            match self.keep_alive().await {
                Ended::LeaseGone => {
                    tracing::warn!(key = %self.key, "etcd lease lost; registering again");
                    match grant_and_put(
                        &mut self.client,
                        &self.key,
                        &self.value,
                        self.ttl,
                        self.request_timeout,
                    )
                    .await
                    {
                        Ok(lease) => {
                            self.lease.store(lease, Ordering::Release);
                            self.backoff.reset();
                            tracing::info!(key = %self.key, lease, "registered in etcd again");
                            continue;
                        }
                        Err(error) => {
                            tracing::warn!(key = %self.key, %error, "registering again failed")
                        }
                    }
                }
                Ended::Failed(error) => {
                    tracing::warn!(key = %self.key, %error, "etcd keep-alive failed; retrying")
                }
            }
            tokio::time::sleep(self.backoff.next_delay()).await;
        }
    }

    /// One keep-alive stream: a renewal every third of the TTL, as etcd's own clients do.
    async fn keep_alive(&mut self) -> Ended {
        let lease = self.lease.load(Ordering::Acquire);
        let opened = timeout(self.request_timeout, self.client.lease_keep_alive(lease)).await;
        let (mut keeper, mut responses) = match opened {
            Ok(Ok(stream)) => stream,
            // etcd-client reports a lease with no time left this way.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => return Ended::LeaseGone,
            Ok(Err(error)) => return Ended::Failed(EtcdError::request("keep-alive", error)),
            Err(_) => return Ended::Failed(EtcdError::timeout("keep-alive", self.request_timeout)),
        };
        self.backoff.reset();
        let interval = Duration::from_secs(self.ttl as u64) / 3;
        loop {
            tokio::time::sleep(interval).await;
            if let Err(error) = keeper.keep_alive().await {
                return Ended::Failed(EtcdError::request("keep-alive", error));
            }
            match timeout(self.request_timeout, responses.message()).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return Ended::LeaseGone,
                Ok(Ok(None)) => {
                    let closed = etcd_client::Error::LeaseKeepAliveError("stream closed".into());
                    return Ended::Failed(EtcdError::request("keep-alive", closed));
                }
                Ok(Err(error)) => return Ended::Failed(EtcdError::request("keep-alive", error)),
                Err(_) => {
                    return Ended::Failed(EtcdError::timeout("keep-alive", self.request_timeout))
                }
            }
        }
    }
}
