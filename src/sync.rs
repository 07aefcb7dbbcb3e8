//! Synchronisation primitives, swapped for loom's under `--cfg tower_lb_loom` so the lock-free
//! parts (the endpoint reference count and the published table) can be model-checked.

#[cfg(tower_lb_loom)]
pub(crate) use loom::sync::{
    atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering},
    Arc, Mutex, MutexGuard,
};

#[cfg(not(tower_lb_loom))]
pub(crate) use std::sync::{
    atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering},
    Arc, Mutex, MutexGuard,
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
