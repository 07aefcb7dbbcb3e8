//! The endpoint table: what the discovery task publishes and every clone reads.
//!
//! Publishing is rare (membership, weight or strategy changes) and reading is per request, so
//! the table is a version number beside a mutex-guarded `Arc`. A reader compares the version
//! with the one it last saw (one atomic load on the request path) and takes the lock only when
//! it changed, to pick up the new snapshot. The version is written inside the lock, so a
//! reader that saw a new version and then locks always gets that snapshot or a newer one.

use crate::sync::{lock, Arc, AtomicU64, Mutex, Ordering};

pub(crate) struct Published<T> {
    version: AtomicU64,
    current: Mutex<(u64, Arc<T>)>,
}

impl<T> Published<T> {
    pub(crate) fn new(initial: T) -> Self {
        Self {
            version: AtomicU64::new(0),
            current: Mutex::new((0, Arc::new(initial))),
        }
    }

    /// The version of the newest snapshot.
    #[inline]
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The newest snapshot and its version.
    pub(crate) fn load(&self) -> (u64, Arc<T>) {
        let current = lock(&self.current);
        (current.0, Arc::clone(&current.1))
    }

    /// Replaces the snapshot; readers see it from their next version check.
    pub(crate) fn publish(&self, next: T) {
        let next = Arc::new(next);
        let old = {
            let mut current = lock(&self.current);
            let version = current.0 + 1;
            let old = std::mem::replace(&mut *current, (version, next));
            self.version.store(version, Ordering::Release);
            old
        };
        // The old snapshot (and with it, maybe, services) is dropped outside the lock.
        drop(old);
    }
}

#[cfg(all(test, tower_lb_loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// A reader that sees a version always loads a snapshot at least that new, and versions
    /// and snapshots never go backwards, while a writer publishes twice.
    #[test]
    fn readers_never_see_a_version_without_its_snapshot() {
        loom::model(|| {
            let table = Arc::new(Published::new(0u64));
            let writer = {
                let table = Arc::clone(&table);
                thread::spawn(move || {
                    table.publish(1);
                    table.publish(2);
                })
            };
            let mut last = 0;
            for _ in 0..2 {
                let seen = table.version();
                let (version, snapshot) = table.load();
                assert!(version >= seen);
                assert_eq!(*snapshot, version, "the snapshot matches its version");
                assert!(*snapshot >= last);
                last = *snapshot;
            }
            writer.join().unwrap();
            assert_eq!(table.version(), 2);
        });
    }
}
