//! Synchronisation primitives, swapped for loom's under `--cfg tower_lb_loom` so the lock-free
//! parts (the endpoint reference count and the published table) can be model-checked.

#[cfg(tower_lb_loom)]
pub(crate) use loom::future::AtomicWaker;
#[cfg(tower_lb_loom)]
pub(crate) use loom::sync::{
    atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering},
    Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard,
};

#[cfg(not(tower_lb_loom))]
pub(crate) use futures_util::task::AtomicWaker;
#[cfg(not(tower_lb_loom))]
pub(crate) use std::sync::{
    atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering},
    Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard,
};

/// Locks a mutex, ignoring poisoning: every critical section in this crate leaves the data
/// consistent before anything that could panic, so a poisoned lock still holds valid state.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(tower_lb_loom)]
    {
        mutex.lock().unwrap()
    }
    #[cfg(not(tower_lb_loom))]
    {
        mutex
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Read-locks a lock, ignoring poisoning, for the same reason as [`lock`].
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    #[cfg(tower_lb_loom)]
    {
        lock.read().unwrap()
    }
    #[cfg(not(tower_lb_loom))]
    {
        lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Replaces the value behind a lock, ignoring poisoning; returns the old value.
pub(crate) fn replace<T>(lock: &RwLock<T>, value: T) -> T {
    #[cfg(tower_lb_loom)]
    let mut guard = lock.write().unwrap();
    #[cfg(not(tower_lb_loom))]
    let mut guard = lock
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    std::mem::replace(&mut *guard, value)
}

/// Keeps a value on cache lines of its own, so that writes to its neighbours (a reference
/// count, a counter every clone bumps) do not evict it from the caches of readers.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Registers `waker` in `cell` (loom's `AtomicWaker` takes it by value, futures' by
/// reference).
pub(crate) fn register(cell: &AtomicWaker, waker: &std::task::Waker) {
    #[cfg(tower_lb_loom)]
    cell.register_by_ref(waker);
    #[cfg(not(tower_lb_loom))]
    cell.register(waker);
}
