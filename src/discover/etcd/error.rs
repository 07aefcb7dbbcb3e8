//! What etcd discovery and registration report.

use std::fmt;
use std::time::Duration;

/// A failure of etcd discovery or registration.
///
/// In a [`watch`](super::watch) stream none of these is the end: a balancer logs each one
/// (`tracing`), counts it in its stats (`discovery_errors`) and keeps its last endpoint set,
/// and the stream goes on: requests to etcd are retried after a backoff, a malformed value is
/// skipped.
#[derive(Debug)]
#[non_exhaustive]
pub enum EtcdError {
    /// A request to etcd failed: etcd is unreachable, restarting, or refused it.
    Request {
        /// What was being done: `list`, `watch`, `grant`, `put`, `keep-alive`, `delete`,
        /// `revoke`.
        during: &'static str,
        /// etcd-client's error.
        source: etcd_client::Error,
    },
    /// A request to etcd took longer than the request timeout.
    Timeout {
        /// What was being done.
        during: &'static str,
        /// The limit it exceeded.
        after: Duration,
    },
    /// etcd closed the watch (it is shutting down, or the connection was closed).
    WatchEnded,
    /// etcd cancelled the watch for a reason other than compaction (a compacted watch is
    /// listed again silently).
    WatchCancelled {
        /// etcd's reason.
        reason: String,
    },
    /// A key's value names no endpoint: skipped, and the key keeps the endpoint it named
    /// before, if any.
    Malformed {
        /// The key (lossily as UTF-8).
        key: String,
        /// What is wrong with the value.
        problem: String,
    },
    /// A value names its endpoint by a host name that did not resolve: skipped like a
    /// malformed value.
    Unresolved {
        /// The key (lossily as UTF-8).
        key: String,
        /// The `host:port` that did not resolve.
        name: String,
        /// Why.
        problem: String,
    },
}

impl EtcdError {
    pub(crate) fn request(during: &'static str, source: etcd_client::Error) -> Self {
        EtcdError::Request { during, source }
    }

    pub(crate) fn timeout(during: &'static str, after: Duration) -> Self {
        EtcdError::Timeout { during, after }
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Request { during, source } => write!(f, "etcd {during} failed: {source}"),
            EtcdError::Timeout { during, after } => {
                write!(f, "etcd {during} got no answer within {after:?}")
            }
            EtcdError::WatchEnded => f.write_str("etcd closed the watch"),
            EtcdError::WatchCancelled { reason } => {
                write!(f, "etcd cancelled the watch: {reason}")
            }
            EtcdError::Malformed { key, problem } => {
                write!(f, "etcd key {key:?} skipped: {problem}")
            }
            EtcdError::Unresolved { key, name, problem } => {
                write!(
                    f,
                    "etcd key {key:?} skipped: {name} did not resolve: {problem}"
                )
            }
        }
    }
}

impl std::error::Error for EtcdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EtcdError::Request { source, .. } => Some(source),
            _ => None,
        }
    }
}
