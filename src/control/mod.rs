//! Discovery processing, off the request path.
//!
//! One task per balancer — the [`driver`] — owns the discovery stream and the strategy. Its
//! loop applies discovery's changes to the membership ([`registry`]), lets the passive health
//! state machines ([`health`](crate::health)) act on failures and time, and publishes endpoint
//! tables ([`table`]) that every clone of the balancer reads. It runs whether or not requests
//! arrive, and ends when the last clone is dropped.
//!
//! The contract between the request path and the task is narrow: clones read the newest
//! [`Snapshot`](table::Snapshot) through the [`Table`](table::Table), and reach the task only
//! by [`Message`]s on one channel (a failed readiness check, an ejection, a rebuild). Handles
//! change the registry under its lock and send a message; the task publishes.

pub(crate) mod driver;
pub(crate) mod registry;
pub(crate) mod table;

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::OnceLock;

use tokio::sync::{mpsc, Notify};

use crate::endpoint::EndpointHandle;
use crate::error::Error;
use crate::stats::Stats;
use crate::util::sync::{lock, AtomicBool, AtomicU64, Mutex, Ordering};
use registry::Registry;
use table::{Snapshot, Table};

/// What wakes the discovery task: the request path and handles send these, and nothing else
/// wakes it besides discovery and its timer.
pub(crate) enum Message {
    /// A clone saw this endpoint's service (of this id) fail `poll_ready`.
    Failed { handle: EndpointHandle, id: u64 },
    /// Outlier detection ejected an endpoint on the response path: time its ejection.
    Ejected,
    /// Weights changed or an endpoint started draining: build a new table.
    Rebuild,
}

/// What the discovery task shares with every clone of the balancer: the table, the registry
/// (for stats and handles), the way to message the task, and how the task is doing.
///
/// `X` is what the request path adds for itself (the request key, settings, the clone
/// counter); the task never looks at it.
pub(crate) struct Shared<K, S, P, X> {
    pub(crate) table: Table<Snapshot<S, P>>,
    pub(crate) registry: Mutex<Registry<K, S>>,
    /// Woken on every publish, for clones waiting for endpoints.
    pub(crate) published: std::sync::Arc<Notify>,
    /// The task ends when this, the only sender, is dropped with the last clone.
    pub(crate) messages: mpsc::UnboundedSender<Message>,
    pub(crate) task: Task,
    pub(crate) status: Status,
    pub(crate) front: X,
}

/// The discovery task as a future, until it is spawned.
pub(crate) type TaskFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the discovery task runs: spawned at construction when a runtime is current,
/// otherwise at the first `poll_ready`.
pub(crate) struct Task {
    unspawned: Mutex<Option<TaskFuture>>,
    spawned: AtomicBool,
}

impl Task {
    pub(crate) fn new() -> Self {
        Self {
            unspawned: Mutex::new(None),
            spawned: AtomicBool::new(false),
        }
    }

    /// Keeps `task` until it is spawned.
    pub(crate) fn hold(&self, task: TaskFuture) {
        *lock(&self.unspawned) = Some(task);
    }

    /// Makes sure the task runs; fails only if it has not been started yet and there is still
    /// no runtime to start it on.
    #[inline]
    pub(crate) fn ensure_spawned(&self) -> Result<(), Error> {
        if self.spawned.load(Ordering::Acquire) {
            return Ok(());
        }
        self.spawn()
    }

    #[cold]
    pub(crate) fn spawn(&self) -> Result<(), Error> {
        let mut unspawned = lock(&self.unspawned);
        if unspawned.is_some() {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
            if let Some(task) = unspawned.take() {
                runtime.spawn(task);
            }
        }
        self.spawned.store(true, Ordering::Release);
        Ok(())
    }
}

/// How discovery is going, for stats and for the request path.
#[derive(Default)]
pub(crate) struct Status {
    pub(crate) discovery_errors: AtomicU64,
    pub(crate) discovery_ended: AtomicBool,
    /// Whether the last table was built in panic mode.
    pub(crate) panicking: AtomicBool,
    /// Why the task stopped, if it failed (the table's version says so too).
    failure: OnceLock<String>,
}

impl<K, S, P, X> Shared<K, S, P, X> {
    pub(crate) fn new(
        empty: Snapshot<S, P>,
        messages: mpsc::UnboundedSender<Message>,
        front: X,
    ) -> Self
    where
        K: Hash + Eq + Clone,
    {
        Self {
            table: Table::new(empty),
            registry: Mutex::new(Registry::new()),
            published: std::sync::Arc::new(Notify::new()),
            messages,
            task: Task::new(),
            status: Status::default(),
            front,
        }
    }

    /// The error every request gets once the discovery task has failed.
    pub(crate) fn failure(&self) -> Error {
        Error::DiscoveryFailed(
            self.status
                .failure
                .get()
                .cloned()
                .unwrap_or_else(|| "the discovery task stopped".to_owned()),
        )
    }

    /// Records that the discovery task failed; requests fail from their next `poll_ready`.
    pub(crate) fn fail(&self, message: String) {
        tracing::error!(%message, "the balancer's discovery task failed; every request fails from now on");
        let _ = self.status.failure.set(message);
        self.table.fail();
        self.published.notify_waiters();
    }

    pub(crate) fn stats(&self) -> Stats<K>
    where
        K: Hash + Eq + Clone,
    {
        let mut registry = lock(&self.registry);
        let endpoints = registry.stats();
        let (removed_picks, removed_failures) = registry.forgotten();
        Stats {
            endpoints,
            panic_mode: self.status.panicking.load(Ordering::Relaxed),
            removed_picks,
            removed_failures,
            discovery_errors: self.status.discovery_errors.load(Ordering::Relaxed),
            discovery_ended: self.status.discovery_ended.load(Ordering::Relaxed),
            discovery_failure: self.status.failure.get().cloned(),
        }
    }
}
