//! [`watch`]: the discovery stream of the endpoints registered under a service's prefix.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};
use futures_core::Stream;
use futures_util::stream::{BoxStream, StreamExt};
use tokio::time::timeout;
use tower::discover::Change;

use super::backoff::Backoff;
use super::error::EtcdError;
use super::keys::{Entry, Keys};
use super::value::{self, Host, Registered};
use crate::discover::Target;
use crate::error::ConfigError;

/// How long one request to etcd (a list, opening a watch, resolving a name) may take by
/// default before it counts as failed.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The first delay after a failure to reach etcd, by default.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest delay between attempts to reach etcd, by default.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Watches the endpoints registered for `service`: every key under `<service>/`, as gRPC-Go's
/// etcd naming lays them out (a trailing `/` on `service` is ignored).
///
/// The stream yields `Insert(addr, target)` and `Remove(addr)`, keyed by socket address; map
/// the [`Target`]s to endpoint services with [`connect`](crate::discover::connect). See the
/// [module docs](super) for the protocol, the value formats and what happens when etcd is
/// unreachable or a value is malformed. An empty service name is rejected.
pub fn watch(client: Client, service: &str) -> Result<EtcdWatch, ConfigError> {
    let prefix = service_prefix(service)?;
    Ok(EtcdWatch {
        prefix: prefix.clone(),
        running: None,
        idle: Some(Box::new(Watcher {
            client,
            prefix,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            backoff: Backoff::new(DEFAULT_BACKOFF_MIN, DEFAULT_BACKOFF_MAX),
            keys: Keys::default(),
            revision: 0,
            must_list: true,
            stream: None,
            retry_in: None,
            out: VecDeque::new(),
        })),
    })
}

/// The key prefix of a service's registrations: `<service>/`.
pub(crate) fn service_prefix(service: &str) -> Result<String, ConfigError> {
    let service = service.strip_suffix('/').unwrap_or(service);
    if service.is_empty() {
        return Err(ConfigError::new(
            "service",
            "empty: it would watch (or register under) every key in etcd",
        ));
    }
    Ok(format!("{service}/"))
}

/// The discovery stream [`watch`] returns: `Change<SocketAddr, Target>`s, and an
/// [`EtcdError`] for each failure, after which it goes on.
pub struct EtcdWatch {
    prefix: String,
    /// Until the first poll, when settings can still change.
    idle: Option<Box<Watcher>>,
    running: Option<BoxStream<'static, Result<Change<SocketAddr, Target>, EtcdError>>>,
}

impl EtcdWatch {
    /// How long one request (listing the prefix, opening the watch, resolving a host name) may
    /// take before it counts as a failure and is retried after the backoff. Default:
    /// [`DEFAULT_REQUEST_TIMEOUT`] (10 s). Zero is rejected.
    ///
    /// An open watch has no such limit: it is quiet while nothing changes. Set
    /// `etcd_client::ConnectOptions::with_keep_alive` to notice a connection that died
    /// silently.
    pub fn request_timeout(mut self, request_timeout: Duration) -> Result<Self, ConfigError> {
        if request_timeout.is_zero() {
            return Err(ConfigError::new(
                "request_timeout",
                "zero would fail every request",
            ));
        }
        self.configure(|w| w.request_timeout = request_timeout);
        Ok(self)
    }

    /// The delay after a failure to reach etcd: `min` at first, doubling up to `max`, each
    /// drawn from the upper half of its range, and `min` again after a success. Defaults:
    /// [`DEFAULT_BACKOFF_MIN`] (100 ms) up to [`DEFAULT_BACKOFF_MAX`] (5 s). A zero `min` and
    /// a `max` below `min` are rejected.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Result<Self, ConfigError> {
        if min.is_zero() {
            return Err(ConfigError::new(
                "backoff",
                "a zero minimum would retry an unreachable etcd in a busy loop",
            ));
        }
        if max < min {
            return Err(ConfigError::new(
                "backoff",
                format!("the maximum {max:?} is below the minimum {min:?}"),
            ));
        }
        self.configure(|w| w.backoff = Backoff::new(min, max));
        Ok(self)
    }

    /// Settings apply until the stream is first polled (a balancer polls it at once).
    fn configure(&mut self, set: impl FnOnce(&mut Watcher)) {
        match &mut self.idle {
            Some(watcher) => set(watcher),
            None => tracing::warn!("etcd watch settings changed after the watch started; ignored"),
        }
    }
}

impl Stream for EtcdWatch {
    type Item = Result<Change<SocketAddr, Target>, EtcdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(watcher) = self.idle.take() {
            let stream = futures_util::stream::unfold(watcher, |mut watcher| async move {
                let item = watcher.next().await;
                Some((item, watcher))
            });
            self.running = Some(stream.boxed());
        }
        match &mut self.running {
            Some(stream) => stream.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

impl fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdWatch")
            .field("prefix", &self.prefix)
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

/// The list-then-watch loop.
struct Watcher {
    client: Client,
    prefix: String,
    request_timeout: Duration,
    backoff: Backoff,
    keys: Keys,
    /// Every change up to this revision has been seen; the watch resumes after it.
    revision: i64,
    must_list: bool,
    stream: Option<WatchStream>,
    /// Wait this long before the next request (after a failure).
    retry_in: Option<Duration>,
    out: VecDeque<Result<Change<SocketAddr, Target>, EtcdError>>,
}

impl Watcher {
    async fn next(&mut self) -> Result<Change<SocketAddr, Target>, EtcdError> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return item;
            }
            if let Some(delay) = self.retry_in.take() {
                tokio::time::sleep(delay).await;
            }
            if self.must_list {
                self.list().await;
            } else if let Some(stream) = &mut self.stream {
                let message = stream.message().await;
                self.on_message(message).await;
            } else {
                self.open_watch().await;
            }
        }
    }

    /// Lists the prefix and notes the revision; yields the difference from what was known.
    async fn list(&mut self) {
        let request = self
            .client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()));
        let response = match timeout(self.request_timeout, request).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return self.fail(EtcdError::request("list", error)),
            Err(_) => return self.fail(EtcdError::timeout("list", self.request_timeout)),
        };
        let mut listed = HashMap::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            match self.read(kv.key(), kv.value(), kv.mod_revision()).await {
                Ok(Some(entry)) => {
                    listed.insert(kv.key().to_vec(), entry);
                }
                Ok(None) => {}
                Err(error) => {
                    // As on the watch: a bad value keeps what the key said before.
                    if let Some(previous) = self.keys.get(kv.key()) {
                        listed.insert(kv.key().to_vec(), previous.clone());
                    }
                    self.report(error);
                }
            }
        }
        self.keys.replace(listed);
        self.revision = response.header().map_or(0, |header| header.revision());
        self.must_list = false;
        self.stream = None;
        self.backoff.reset();
        self.publish();
        tracing::debug!(
            prefix = %self.prefix,
            revision = self.revision,
            endpoints = self.keys.published(),
            "etcd prefix listed"
        );
    }

    /// Watches the prefix from the revision after the last one seen.
    async fn open_watch(&mut self) {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1)
            .with_progress_notify();
        let request = self.client.watch(self.prefix.as_str(), Some(options));
        match timeout(self.request_timeout, request).await {
            Ok(Ok(stream)) => self.stream = Some(stream),
            Ok(Err(error)) => self.fail(EtcdError::request("watch", error)),
            Err(_) => self.fail(EtcdError::timeout("watch", self.request_timeout)),
        }
    }

    async fn on_message(&mut self, message: Result<Option<WatchResponse>, etcd_client::Error>) {
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                self.stream = None;
                return self.fail(EtcdError::WatchEnded);
            }
            Err(error) => {
                self.stream = None;
                return self.fail(EtcdError::request("watch", error));
            }
        };
        if response.canceled() {
            self.stream = None;
            self.must_list = true;
            if response.compact_revision() > 0 {
                tracing::info!(
                    prefix = %self.prefix,
                    revision = self.revision,
                    compacted = response.compact_revision(),
                    "etcd compacted the history the watch needed; listing again"
                );
            } else {
                let reason = response.cancel_reason().to_owned();
                self.fail(EtcdError::WatchCancelled { reason });
            }
            return;
        }
        let store_revision = response.header().map_or(0, |header| header.revision());
        if response.created() && store_revision < self.revision {
            // The cluster's history went back (restored from a backup, or a new cluster at
            // the same address): resuming would wait for revisions that will never come.
            tracing::warn!(
                prefix = %self.prefix,
                revision = self.revision,
                store_revision,
                "etcd's revision went back; listing again"
            );
            self.stream = None;
            self.must_list = true;
            return;
        }
        if response.events().is_empty() {
            if !response.created() {
                // A progress notification: nothing under the prefix changed up to here.
                self.revision = self.revision.max(store_revision);
                self.backoff.reset();
            }
            return;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            match event.event_type() {
                EventType::Put => match self.read(kv.key(), kv.value(), kv.mod_revision()).await {
                    Ok(Some(entry)) => self.keys.put(kv.key().to_vec(), entry),
                    Ok(None) => self.keys.delete(kv.key()),
                    // The key keeps what it said before.
                    Err(error) => self.report(error),
                },
                EventType::Delete => self.keys.delete(kv.key()),
            }
        }
        self.backoff.reset();
        self.publish();
    }

    /// What a value registers; `None` for gRPC-Go's delete operation.
    async fn read(
        &self,
        key: &[u8],
        value: &[u8],
        revision: i64,
    ) -> Result<Option<Entry>, EtcdError> {
        let malformed = |problem: String| EtcdError::Malformed {
            key: String::from_utf8_lossy(key).into_owned(),
            problem,
        };
        let (host, port, weight) = match value::parse(value).map_err(malformed)? {
            Registered::Deleted => return Ok(None),
            Registered::Endpoint { host, port, weight } => (host, port, weight),
        };
        let target = match host {
            Host::Ip(ip) => Target::new(SocketAddr::new(ip, port)),
            Host::Name(name) => {
                let authority = format!("{name}:{port}");
                let resolved = timeout(
                    self.request_timeout,
                    tokio::net::lookup_host(authority.as_str()),
                )
                .await;
                let unresolved = |problem: String| EtcdError::Unresolved {
                    key: String::from_utf8_lossy(key).into_owned(),
                    name: authority.clone(),
                    problem,
                };
                let addr = match resolved {
                    Ok(Ok(mut addrs)) => addrs
                        .next()
                        .ok_or_else(|| unresolved("no addresses".to_owned()))?,
                    Ok(Err(error)) => return Err(unresolved(error.to_string())),
                    Err(_) => {
                        return Err(unresolved(format!(
                            "no answer within {:?}",
                            self.request_timeout
                        )))
                    }
                };
                Target::new(addr)
                    .with_authority(&authority)
                    .map_err(|error| malformed(error.to_string()))?
            }
        };
        Ok(Some(Entry {
            revision,
            target: target.with_weight(weight),
        }))
    }

    fn publish(&mut self) {
        for change in self.keys.changes() {
            match &change {
                Change::Insert(addr, target) => {
                    let prefix = &self.prefix;
                    tracing::info!(%prefix, %addr, %target, "etcd endpoint registered")
                }
                Change::Remove(addr) => {
                    tracing::info!(prefix = %self.prefix, %addr, "etcd endpoint gone")
                }
            }
            self.out.push_back(Ok(change));
        }
    }

    /// Reports an error; the stream goes on.
    fn report(&mut self, error: EtcdError) {
        tracing::warn!(prefix = %self.prefix, %error, "etcd discovery");
        self.out.push_back(Err(error));
    }

    /// Reports a failure to reach etcd and waits the backoff before the next request.
    fn fail(&mut self, error: EtcdError) {
        let delay = self.backoff.next_delay();
        tracing::warn!(
            prefix = %self.prefix,
            %error,
            retry_in = ?delay,
            "etcd unreachable; keeping the last endpoint set"
        );
        self.out.push_back(Err(error));
        self.retry_in = Some(delay);
    }
}
