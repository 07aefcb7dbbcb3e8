//! One spare value, taken and given back without waiting: the place where a dropped clone
//! leaves its copy of an endpoint's service for the next clone (see
//! [`Origin`](crate::control::table::Origin)).
//!
//! A three-state flag guards the value: `EMPTY`, `FULL`, and `BUSY` while one thread moves a
//! value in or out. Taking is one compare-and-swap (`FULL` → `BUSY`) and a store; giving back
//! is one compare-and-swap (`EMPTY` → `BUSY`) and a store. Nobody waits: a taker that finds
//! the place empty or busy gets nothing (and clones the service instead), a giver that finds
//! it full or busy keeps its value (and drops it). The value is only touched by the thread
//! whose compare-and-swap moved the flag to `BUSY`, which the flag's acquire and release
//! orderings hand from one owner to the next. A `Mutex` would do the same with two atomic
//! read-modify-writes per side instead of one; on the request path of a clone made per
//! request, that difference is what this saves (measured in `benches/overhead.rs`).

use crate::util::sync::{AtomicU8, Ordering};

const EMPTY: u8 = 0;
const FULL: u8 = 1;
const BUSY: u8 = 2;

/// One optional value that threads take and give back without waiting; see the
/// [module docs](self).
pub(crate) struct Spare<T> {
    state: AtomicU8,
    value: UnsafeCell<Option<T>>,
}

// SAFETY: the value is only reached by the thread that moved `state` to `BUSY` (see `take`
// and `give`), so sharing a `Spare` shares no access to the value; moving values in and out
// across threads needs `T: Send`.
unsafe impl<T: Send> Sync for Spare<T> {}

impl<T> Spare<T> {
    /// An empty place.
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU8::new(EMPTY),
            value: UnsafeCell::new(None),
        }
    }

    /// The value, if there is one and no other thread is moving it right now.
    #[inline]
    pub(crate) fn take(&self) -> Option<T> {
        self.state
            .compare_exchange(FULL, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // SAFETY: our compare-and-swap moved the flag to `BUSY`: no other thread touches the
        // value until we store `EMPTY`; its acquire ordering made the giver's write visible.
        let value = self.value.with_mut(|value| unsafe { (*value).take() });
        self.state.store(EMPTY, Ordering::Release);
        value
    }

    /// Keeps `value` if the place is empty and free; otherwise gives it back, for the caller
    /// to drop (outside anything it holds: dropping a service runs the user's code).
    #[inline]
    pub(crate) fn give(&self, value: T) -> Option<T> {
        if self
            .state
            .compare_exchange(EMPTY, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Some(value);
        }
        // SAFETY: as in `take`; the place was empty, so this overwrites (drops) only `None`.
        self.value.with_mut(|slot| unsafe { *slot = Some(value) });
        self.state.store(FULL, Ordering::Release);
        None
    }
}

#[cfg(tower_lb_loom)]
use loom::cell::UnsafeCell;

/// `std`'s `UnsafeCell` with loom's interface, so the same code is model-checked.
#[cfg(not(tower_lb_loom))]
struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(tower_lb_loom))]
impl<T> UnsafeCell<T> {
    fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    #[inline(always)]
    fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(all(test, not(tower_lb_loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_value_at_a_time() {
        let spare = Spare::new();
        assert_eq!(spare.take(), None, "empty at first");
        assert_eq!(spare.give(1), None, "kept");
        assert_eq!(spare.give(2), Some(2), "full: the second comes back");
        assert_eq!(spare.take(), Some(1));
        assert_eq!(spare.take(), None, "taken once");
        assert_eq!(spare.give(3), None);
        assert_eq!(spare.take(), Some(3));
    }

    #[test]
    fn a_kept_value_is_dropped_with_the_place() {
        let value = std::sync::Arc::new(());
        let spare = Spare::new();
        assert!(spare.give(std::sync::Arc::clone(&value)).is_none());
        assert_eq!(std::sync::Arc::strong_count(&value), 2);
        drop(spare);
        assert_eq!(std::sync::Arc::strong_count(&value), 1);
    }
}

#[cfg(all(test, tower_lb_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;
    use loom::thread;

    /// A value that counts its drops.
    struct Counted(u32, Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Two threads each take the spare (or make a new value) and give one back, as two
    /// clones made per request do, while the place starts full. Loom checks every
    /// interleaving: no value is ever reached by two threads at once (loom's cell tracks the
    /// accesses), and every value made is dropped exactly once — none lost, none twice.
    #[test]
    fn spares_move_between_threads_without_loss_or_sharing() {
        loom::model(|| {
            let made = Arc::new(AtomicUsize::new(1));
            let drops = Arc::new(AtomicUsize::new(0));
            let spare = Arc::new(Spare::new());
            assert!(spare.give(Counted(0, Arc::clone(&drops))).is_none());
            let threads: Vec<_> = (1..=2)
                .map(|n| {
                    let spare = Arc::clone(&spare);
                    let made = Arc::clone(&made);
                    let drops = Arc::clone(&drops);
                    thread::spawn(move || {
                        let value = spare.take().unwrap_or_else(|| {
                            made.fetch_add(1, Ordering::Relaxed);
                            Counted(n, Arc::clone(&drops))
                        });
                        assert!(value.0 <= 2);
                        drop(spare.give(value));
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            assert!(
                spare.take().is_some(),
                "the last giver found the place free"
            );
            drop(spare);
            assert_eq!(
                drops.load(Ordering::Relaxed),
                made.load(Ordering::Relaxed),
                "every value dropped exactly once"
            );
        });
    }
}
