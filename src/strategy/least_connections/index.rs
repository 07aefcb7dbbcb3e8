//! An index of endpoints by in-flight count, kept current by the endpoints themselves.
//!
//! Least-connections wants the endpoint with the fewest requests in flight without reading
//! every endpoint. This index answers "which endpoints have exactly `l` requests in flight"
//! for every `l` below [`LEVELS`]: one bitmap per level over *slots* (an endpoint gets a slot
//! when a picker attaches it), a summary per level with one bit per non-empty bitmap word, and
//! a mask of non-empty levels. Finding the lowest occupied level and a member of it costs a
//! few loads whatever the number of endpoints.
//!
//! # Who writes what
//!
//! - An attached endpoint makes sure its bit is set at its new level every time its in-flight
//!   count changes, on the request path (`EndpointHandle::dispatch` and the in-flight guard's
//!   drop): one load when the bit is already set (the common case once traffic flows: the bits
//!   of the levels an endpoint moves between stay set), else one atomic `or`, plus one more on
//!   the rare occasions its word or summary word was empty. It never clears the bit of its old
//!   level: that clear would race with its next change.
//! - Pickers clear the bits they find wrong (the endpoint is no longer at that level, or is not
//!   in their table), then look again and put the bit back if it has become right meanwhile.
//!   Summary and mask bits are cleared the same way when what they summarise is found empty.
//!
//! So a bit may be left set where it no longer belongs (the picker that meets it clears it:
//! one clear per level change, amortised) but is never missing: once the counts stop
//! changing, every attached endpoint with fewer than [`LEVELS`] requests in flight has its bit
//! set at its level, and the summary and mask above it say so. That is what makes a pick from
//! the index exact.
//!
//! # Why nothing goes missing
//!
//! The argument is the same at every layer. A setter changes the thing below (the in-flight
//! count, or a bitmap word) and then sets the bit with a `Release` read-modify-write; a
//! cleaner clears the bit with an `Acquire` read-modify-write and then reads the thing below
//! again. Two read-modify-writes of one word are totally ordered: if the set comes second the
//! bit ends set; if the clear comes second it read the set's value, so it synchronises with the
//! setter, its second look sees the change, and it puts the bit back. A summary (mask) bit is
//! set only by the setter that turned its word (summary word) from empty to non-empty; by the
//! same argument applied to the last such turn, that is enough.
//!
//! An endpoint skips the `or` when a load finds its bit set ([`LoadIndex::report`]). A plain
//! load racing the clear is the store-buffering pattern (setter: write count, read bit;
//! cleaner: write bit, read count — both may read the old value), so here the two sides meet
//! on the endpoint's count word instead: the endpoint changes its count with a
//! read-modify-write and then fences `Acquire` before loading the bit, and the cleaner's second
//! look at the count is a read-modify-write too (`EndpointState::in_flight_latest`). If the
//! cleaner's comes second in the count's order it reads the new count and puts the bit back;
//! if the endpoint's comes second it read the cleaner's (`Release`) write, so after its fence
//! it sees the bit cleared and sets it.

use std::any::Any;
use std::sync::Arc;

use crate::endpoint::LoadReport;
use crate::util::sync::{AtomicU64, Ordering};

/// In-flight counts the index tracks: `0..LEVELS`. An endpoint with more requests in flight
/// has no bit; a picker that finds no level occupied falls back to reading every endpoint.
#[cfg(not(tower_lb_loom))]
pub(crate) const LEVELS: usize = 64;
/// Fewer levels under loom, so that models of indexes with thousands of slots stay small; the
/// algorithm does not depend on the number.
#[cfg(tower_lb_loom)]
pub(crate) const LEVELS: usize = 4;

/// What a picker makes of an endpoint whose bit it met at some level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The endpoint is at this level and the picker wants it: the search ends.
    Take,
    /// The endpoint is at this level but the picker passes over it (the bit stays).
    Pass,
    /// The bit is wrong for this picker (the endpoint moved, or is not in its table).
    Clear,
}

/// What a search of one level found.
enum Scan {
    Taken(usize),
    /// Only endpoints the picker passed over.
    Passed,
    Empty,
}

/// Endpoints by in-flight count; see the [module docs](self).
pub(crate) struct LoadIndex {
    /// Slots, a power of two and at least 64.
    capacity: usize,
    /// Bitmap words per level.
    words: usize,
    /// Summary words per level.
    summary_words: usize,
    /// Bit `l`: level `l` may be occupied.
    mask: AtomicU64,
    /// `LEVELS × words`: bit `s` of level `l` is set when slot `s` may be at level `l`.
    bits: Box<[AtomicU64]>,
    /// `LEVELS × summary_words`: bit `w` of level `l` is set when word `w` of level `l` may be
    /// non-empty.
    summary: Box<[AtomicU64]>,
    /// Slots never handed out yet: `next_slot..capacity`.
    next_slot: AtomicU64,
    /// Slots given back by endpoints that are gone.
    free: Box<[AtomicU64]>,
    /// Bumped by every picker built over this index; see [`LoadIndex::find_lowest`].
    generation: AtomicU64,
}

fn zeroed(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl LoadIndex {
    /// An index with room for at least `capacity` endpoints.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(64).next_power_of_two();
        let words = capacity / 64;
        let summary_words = words.div_ceil(64);
        Self {
            capacity,
            words,
            summary_words,
            mask: AtomicU64::new(0),
            bits: zeroed(LEVELS * words),
            summary: zeroed(LEVELS * summary_words),
            next_slot: AtomicU64::new(0),
            free: zeroed(words),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// A slot for a new endpoint, or `None` when the index is full.
    pub(crate) fn allocate_slot(&self) -> Option<usize> {
        // Recycled slots first, so the occupied part stays dense.
        for (w, word) in self.free.iter().enumerate() {
            let mut free = word.load(Ordering::Acquire);
            while free != 0 {
                let bit = free & free.wrapping_neg();
                if word.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    return Some(w * 64 + bit.trailing_zeros() as usize);
                }
                free = word.load(Ordering::Acquire);
            }
        }
        let mut next = self.next_slot.load(Ordering::Relaxed);
        while (next as usize) < self.capacity {
            match self.next_slot.compare_exchange_weak(
                next,
                next + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(next as usize),
                Err(seen) => next = seen,
            }
        }
        None
    }

    /// Gives back the slot of an endpoint that is gone. Its bits may stay behind; whoever
    /// meets them checks them against the slot's next owner (or finds it has none) and clears
    /// them.
    pub(crate) fn free_slot(&self, slot: usize) {
        self.free[slot / 64].fetch_or(1 << (slot % 64), Ordering::Release);
    }

    /// Starts a new generation of pickers and returns its number.
    pub(crate) fn advance_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether a picker newer than `generation` has been built over the index, asked right
    /// after clearing a bit of a slot that `generation`'s table does not have.
    ///
    /// A read-modify-write, not a load: the slot may belong to an endpoint of the newer
    /// table that skipped its report because it still saw the bit set. If this comes after
    /// that picker's [`advance_generation`](Self::advance_generation) in the generation's
    /// order, it sees the new number and puts the bit back. If it comes before, the advance
    /// reads what this wrote and so synchronises with it, and with the clear before it; the
    /// newer endpoint's reports, which follow the advance, then see the bit cleared and set
    /// it. A plain load could read the old number while the endpoint read the old bit (the
    /// store-buffering pattern) and lose the bit.
    fn newer_than(&self, generation: u64) -> bool {
        self.generation.fetch_add(0, Ordering::AcqRel) != generation
    }

    /// The endpoint in `slot` reports its new in-flight count: as [`LoadIndex::insert`], but
    /// only a load when its bit is already set. Call it only right after changing the count
    /// with a read-modify-write and then fencing `Acquire` (see the module docs).
    #[inline]
    pub(crate) fn report(&self, in_flight: u64, slot: usize) {
        if in_flight >= LEVELS as u64 {
            return;
        }
        let word = &self.bits[in_flight as usize * self.words + slot / 64];
        if word.load(Ordering::Relaxed) & (1 << (slot % 64)) == 0 {
            self.insert(in_flight, slot);
        }
    }

    /// Records that the endpoint in `slot` has `in_flight` requests in flight. Call it after
    /// the count changed, never before. Counts of [`LEVELS`] and more are not tracked.
    #[inline]
    pub(crate) fn insert(&self, in_flight: u64, slot: usize) {
        if in_flight >= LEVELS as u64 {
            return;
        }
        let level = in_flight as usize;
        let word = slot / 64;
        let bit = 1u64 << (slot % 64);
        if self.bits[level * self.words + word].fetch_or(bit, Ordering::Release) == 0 {
            self.raise_summary(level, word);
        }
    }

    /// Word `word` of `level` has just turned non-empty: say so in its summary (and, if the
    /// summary word was empty too, in the mask).
    #[cold]
    fn raise_summary(&self, level: usize, word: usize) {
        let summary = &self.summary[level * self.summary_words + word / 64];
        if summary.fetch_or(1 << (word % 64), Ordering::Release) == 0 {
            self.mask.fetch_or(1 << level, Ordering::Release);
        }
    }

    /// Clears `slot`'s bit at `level`; if that emptied its word, clears the word's summary bit
    /// too (unless the word has filled again).
    fn clear_slot(&self, level: usize, slot: usize) {
        let word = slot / 64;
        let bit = 1u64 << (slot % 64);
        if self.bits[level * self.words + word].fetch_and(!bit, Ordering::AcqRel) == bit {
            self.clear_summary(level, word);
        }
    }

    fn clear_summary(&self, level: usize, word: usize) {
        let summary = &self.summary[level * self.summary_words + word / 64];
        let bit = 1u64 << (word % 64);
        summary.fetch_and(!bit, Ordering::AcqRel);
        if self.bits[level * self.words + word].load(Ordering::Acquire) != 0
            && summary.fetch_or(bit, Ordering::Release) == 0
        {
            self.mask.fetch_or(1 << level, Ordering::Release);
        }
    }

    fn clear_level(&self, level: usize) {
        let bit = 1u64 << level;
        self.mask.fetch_and(!bit, Ordering::AcqRel);
        let summary = &self.summary[level * self.summary_words..][..self.summary_words];
        if summary.iter().any(|s| s.load(Ordering::Acquire) != 0) {
            self.mask.fetch_or(bit, Ordering::Release);
        }
    }

    /// The lowest level at which `judge` takes an endpoint, and that endpoint's slot.
    ///
    /// Levels are searched upward; within a level, slots from `start` on, wrapping around, so
    /// that a picker moving `start` past each slot it takes rotates through the endpoints tied
    /// at the lowest level. With a `filter` (one word per bitmap word), only slots whose filter
    /// bit is set are considered: a picker searches one class of endpoints at a time that way.
    /// `judge(level, slot, second_look)` decides about each set bit; bits
    /// it calls [`Verdict::Clear`] are cleared and judged once more, with `second_look` true —
    /// the judge must then read the endpoint's count with
    /// `EndpointState::in_flight_latest` — and put back if the second verdict differs, or if a
    /// newer picker has been built over this index since `generation` (the value
    /// [`LoadIndex::advance_generation`] gave the caller), since the slot may belong to that
    /// picker's table.
    ///
    /// `None` when no level below [`LEVELS`] holds an endpoint `judge` takes.
    #[inline]
    pub(crate) fn find_lowest(
        &self,
        start: usize,
        generation: u64,
        filter: Option<&[u64]>,
        mut judge: impl FnMut(usize, usize, bool) -> Verdict,
    ) -> Option<(usize, usize)> {
        let start = start & (self.capacity - 1);
        let levels = self.mask.load(Ordering::Acquire);
        if levels == 0 {
            return None;
        }
        // The common case first, inline: the lowest level has an endpoint in the cursor's own
        // word, and it is where its bit says.
        let level = levels.trailing_zeros() as usize;
        let word = self.bits[level * self.words + start / 64].load(Ordering::Acquire)
            & filter.map_or(u64::MAX, |f| f[start / 64])
            & (u64::MAX << (start % 64));
        let mut judged = None;
        if word != 0 {
            let slot = (start & !63) + word.trailing_zeros() as usize;
            match judge(level, slot, false) {
                Verdict::Take => return Some((level, slot)),
                verdict => judged = Some((slot, verdict)),
            }
        }
        self.search(levels, start, generation, filter, judged, &mut judge)
    }

    /// [`LoadIndex::find_lowest`] past its fast path. `judged` is the verdict the fast path
    /// already got (judging a slot twice would count a passed endpoint twice).
    #[inline(never)]
    fn search(
        &self,
        mut levels: u64,
        start: usize,
        generation: u64,
        filter: Option<&[u64]>,
        mut judged: Option<(usize, Verdict)>,
        judge: &mut impl FnMut(usize, usize, bool) -> Verdict,
    ) -> Option<(usize, usize)> {
        while levels != 0 {
            let level = levels.trailing_zeros() as usize;
            levels &= levels - 1;
            match self.scan_level(level, start, generation, filter, judged.take(), judge) {
                Scan::Taken(slot) => return Some((level, slot)),
                Scan::Passed => {}
                // Empty of the filtered class says nothing about the others.
                Scan::Empty if filter.is_some() => {}
                Scan::Empty => self.clear_level(level),
            }
        }
        None
    }

    fn scan_level(
        &self,
        level: usize,
        start: usize,
        generation: u64,
        filter: Option<&[u64]>,
        mut judged: Option<(usize, Verdict)>,
        judge: &mut impl FnMut(usize, usize, bool) -> Verdict,
    ) -> Scan {
        let mut passed = false;
        for (from, to) in [(start, self.capacity), (0, start)] {
            let mut at = from;
            while let Some(slot) = self.next_set(level, at, to, filter) {
                let mut verdict = match judged.take() {
                    Some((known, verdict)) if known == slot => verdict,
                    _ => judge(level, slot, false),
                };
                if verdict == Verdict::Clear {
                    self.clear_slot(level, slot);
                    verdict = judge(level, slot, true);
                    if verdict != Verdict::Clear || self.newer_than(generation) {
                        self.insert(level as u64, slot);
                    }
                }
                match verdict {
                    Verdict::Take => return Scan::Taken(slot),
                    Verdict::Pass => passed = true,
                    Verdict::Clear => {}
                }
                at = slot + 1;
            }
        }
        if passed {
            Scan::Passed
        } else {
            Scan::Empty
        }
    }

    /// The first slot in `from..to` (and in `filter`) whose bit is set at `level`.
    fn next_set(
        &self,
        level: usize,
        from: usize,
        to: usize,
        filter: Option<&[u64]>,
    ) -> Option<usize> {
        if from >= to {
            return None;
        }
        let words = &self.bits[level * self.words..][..self.words];
        let allowed = |word: usize| filter.map_or(u64::MAX, |f| f[word]);
        let mut word = from / 64;
        let mut found =
            words[word].load(Ordering::Acquire) & allowed(word) & (u64::MAX << (from % 64));
        loop {
            if found != 0 {
                let slot = word * 64 + found.trailing_zeros() as usize;
                return (slot < to).then_some(slot);
            }
            word = self.next_occupied_word(level, word + 1, to.div_ceil(64))?;
            let bits = words[word].load(Ordering::Acquire);
            if bits == 0 {
                self.clear_summary(level, word);
            }
            found = bits & allowed(word);
        }
    }

    /// The first word in `from..to` whose summary bit is set at `level`.
    fn next_occupied_word(&self, level: usize, from: usize, to: usize) -> Option<usize> {
        if from >= to {
            return None;
        }
        let summary = &self.summary[level * self.summary_words..][..self.summary_words];
        let mut at = from / 64;
        let mut found = summary[at].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        loop {
            if found != 0 {
                let word = at * 64 + found.trailing_zeros() as usize;
                return (word < to).then_some(word);
            }
            at += 1;
            if at >= self.summary_words || at * 64 >= to {
                return None;
            }
            found = summary[at].load(Ordering::Acquire);
        }
    }

    /// Whether `slot`'s bit is set at `level` and the summary and mask above it say so.
    #[cfg(test)]
    pub(crate) fn holds(&self, level: usize, slot: usize) -> bool {
        let word = slot / 64;
        self.bits[level * self.words + word].load(Ordering::Acquire) & (1 << (slot % 64)) != 0
            && self.summary[level * self.summary_words + word / 64].load(Ordering::Acquire)
                & (1 << (word % 64))
                != 0
            && self.mask.load(Ordering::Acquire) & (1 << level) != 0
    }
}

impl LoadReport for LoadIndex {
    #[inline]
    fn report(&self, slot: usize, in_flight: u64) {
        LoadIndex::report(self, in_flight, slot);
    }

    fn release(&self, slot: usize) {
        self.free_slot(slot);
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

impl std::fmt::Debug for LoadIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadIndex")
            .field("capacity", &self.capacity)
            .field(
                "levels",
                &format_args!("{:#x}", self.mask.load(Ordering::Relaxed)),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(tower_lb_loom)))]
mod tests {
    use super::*;

    /// Takes the slots in `wanted`; clears every other bit.
    fn take_from(wanted: &[(usize, usize)]) -> impl FnMut(usize, usize, bool) -> Verdict + '_ {
        |level, slot, _| {
            if wanted.contains(&(level, slot)) {
                Verdict::Take
            } else {
                Verdict::Clear
            }
        }
    }

    #[test]
    fn finds_the_lowest_level_and_rotates_from_start() {
        let index = LoadIndex::new(300);
        assert_eq!(index.capacity(), 512);
        for slot in [3, 70, 200] {
            index.insert(2, slot);
        }
        index.insert(5, 1);
        let wanted = [(2, 3), (2, 70), (2, 200), (5, 1)];
        assert_eq!(
            index.find_lowest(0, 0, None, take_from(&wanted)),
            Some((2, 3))
        );
        assert_eq!(
            index.find_lowest(4, 0, None, take_from(&wanted)),
            Some((2, 70))
        );
        assert_eq!(
            index.find_lowest(71, 0, None, take_from(&wanted)),
            Some((2, 200))
        );
        assert_eq!(
            index.find_lowest(201, 0, None, take_from(&wanted)),
            Some((2, 3))
        );
    }

    #[test]
    fn clears_wrong_bits_and_their_summaries_and_levels() {
        let index = LoadIndex::new(64 * 64 * 2);
        index.insert(0, 5);
        index.insert(0, 4100);
        index.insert(3, 4100);
        // Slot 5 left level 0 and slot 4100 is now at level 3: level 0 is all wrong.
        let wanted = [(3, 4100)];
        assert_eq!(
            index.find_lowest(0, 0, None, take_from(&wanted)),
            Some((3, 4100))
        );
        assert!(!index.holds(0, 5) && !index.holds(0, 4100));
        assert_eq!(index.mask.load(Ordering::Relaxed), 1 << 3);
        assert!(index
            .summary
            .iter()
            .take(index.summary_words)
            .all(|s| s.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_cleared_bit_comes_back_when_judged_right_the_second_time() {
        let index = LoadIndex::new(64);
        index.insert(1, 9);
        let mut first = true;
        let found = index.find_lowest(0, 0, None, |_, _, _| {
            // The endpoint moves back to the level between the two looks.
            if std::mem::replace(&mut first, false) {
                Verdict::Clear
            } else {
                Verdict::Take
            }
        });
        assert_eq!(found, Some((1, 9)));
        assert!(index.holds(1, 9));
    }

    #[test]
    fn foreign_bits_survive_a_newer_generation() {
        let index = LoadIndex::new(64);
        let old = index.advance_generation();
        index.insert(0, 7);
        let _new = index.advance_generation();
        assert_eq!(
            index.find_lowest(0, old, None, |_, _, _| Verdict::Clear),
            None
        );
        assert!(index.holds(0, 7), "a newer picker may own slot 7");
        let current = index.advance_generation();
        assert_eq!(
            index.find_lowest(0, current, None, |_, _, _| Verdict::Clear),
            None
        );
        assert!(!index.holds(0, 7));
    }

    #[test]
    fn passed_levels_keep_their_bits_and_counts_above_the_window_are_ignored() {
        let index = LoadIndex::new(64);
        index.insert(0, 1);
        index.insert(LEVELS as u64, 2);
        assert_eq!(index.find_lowest(0, 0, None, |_, _, _| Verdict::Pass), None);
        assert!(index.holds(0, 1));
        assert_eq!(index.mask.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_filter_searches_one_class_and_leaves_the_rest() {
        let index = LoadIndex::new(128);
        for slot in [1, 70] {
            index.insert(0, slot);
        }
        index.insert(2, 5);
        index.insert(3, 90);
        // Class {5, 90}: its lowest is 5 at level 2; level 0 holds only other classes.
        let mut filter = vec![0u64; 2];
        filter[0] |= 1 << 5;
        filter[1] |= 1 << (90 - 64);
        let any = |_, _, _| Verdict::Take;
        assert_eq!(index.find_lowest(0, 0, Some(&filter), any), Some((2, 5)));
        assert!(
            index.holds(0, 1) && index.holds(0, 70),
            "other classes untouched"
        );
        // Class members found stale are cleared, and the level stays for the others.
        let stale = |level, slot, _| {
            if (level, slot) == (2, 5) {
                Verdict::Clear
            } else {
                Verdict::Take
            }
        };
        assert_eq!(index.find_lowest(0, 0, Some(&filter), stale), Some((3, 90)));
        assert!(!index.holds(2, 5));
        assert_eq!(index.find_lowest(0, 0, None, any), Some((0, 1)));
    }

    #[test]
    fn slots_are_recycled_before_fresh_ones() {
        let index = LoadIndex::new(64);
        let slots: Vec<_> = (0..64).map(|_| index.allocate_slot().unwrap()).collect();
        assert_eq!(slots, (0..64).collect::<Vec<_>>());
        assert_eq!(index.allocate_slot(), None);
        index.free_slot(17);
        assert_eq!(index.allocate_slot(), Some(17));
        assert_eq!(index.allocate_slot(), None);
    }
}

#[cfg(all(test, tower_lb_loom))]
mod loom_tests {
    use super::*;
    use crate::endpoint::{Activation, EndpointHandle};
    use loom::thread;

    /// An index as endpoints report to it.
    fn sink(index: &Arc<LoadIndex>) -> Arc<dyn LoadReport> {
        Arc::clone(index) as Arc<dyn LoadReport>
    }

    /// An endpoint with slot `slot` in `index`, reporting (at level 0).
    fn reporting(index: &Arc<LoadIndex>, slot: usize) -> EndpointHandle {
        let handle = EndpointHandle::new(1);
        assert!(handle.install_watch(sink(index), slot));
        assert_eq!(handle.activate(), Activation::Activated);
        index.insert(0, slot);
        handle
    }

    /// Slot 0's bit at level 1 is left over from an earlier visit; the endpoint comes back to
    /// level 1 (and, finding the bit set, skips the write) while a picker that read the old
    /// count clears the bit. Whatever the interleaving, once both are done the bit is set, with
    /// its summary and mask.
    #[test]
    fn a_clear_racing_a_report_never_loses_the_bit() {
        loom::model(|| {
            let index = Arc::new(LoadIndex::new(64));
            let count = Arc::new(AtomicU64::new(0));
            index.insert(1, 0);
            let endpoint = {
                let (index, count) = (Arc::clone(&index), Arc::clone(&count));
                thread::spawn(move || {
                    // As an endpoint reports: read-modify-write, fence, report.
                    let now = count.fetch_add(1, Ordering::Relaxed) + 1;
                    crate::util::sync::fence(Ordering::Acquire);
                    index.report(now, 0);
                })
            };
            let found = index.find_lowest(0, 0, None, |level, _, second_look| {
                let count = if second_look {
                    count.fetch_add(0, Ordering::AcqRel)
                } else {
                    count.load(Ordering::Relaxed)
                };
                if count == level as u64 {
                    Verdict::Take
                } else {
                    Verdict::Clear
                }
            });
            endpoint.join().unwrap();
            assert!(found.is_none() || found == Some((1, 0)));
            assert!(index.holds(1, 0), "the bit of slot 0's level is missing");
        });
    }

    /// Two setters fill a word from empty while a picker empties it and clears its summary
    /// and level: the survivors are still found. Run over the first word of a small index and
    /// over a word in the second summary word of an index for more than 4,096 endpoints.
    #[test]
    fn summaries_and_levels_follow_their_words() {
        for (capacity, base) in [(64, 0), (4097, 64 * 65)] {
            loom::model(move || {
                let index = Arc::new(LoadIndex::new(capacity));
                let present = Arc::new(AtomicU64::new(0));
                index.insert(0, base + 5);
                let setter = {
                    let (index, present) = (Arc::clone(&index), Arc::clone(&present));
                    thread::spawn(move || {
                        present.fetch_or(1 << 3, Ordering::Relaxed);
                        index.insert(0, base + 3);
                    })
                };
                // Slot 5 is gone; the picker clears it and whatever else it finds absent.
                let _ = index.find_lowest(0, 0, None, |_, slot, _| {
                    if present.load(Ordering::Relaxed) & (1 << (slot - base)) != 0 {
                        Verdict::Pass
                    } else {
                        Verdict::Clear
                    }
                });
                setter.join().unwrap();
                assert!(
                    index.holds(0, base + 3),
                    "slot 3 is present but not findable"
                );
            });
        }
    }

    /// The race the generation guards against: a picker of an older table clears a stale bit
    /// of a slot its table does not have, while the slot's new endpoint — of a newer table,
    /// built meanwhile — reports that very level and, seeing the stale bit set, skips the write.
    /// The picker's look at the generation after clearing orders with the newer build, so the
    /// bit is put back (or the endpoint sees it cleared and sets it). Over an index for more
    /// than 4,096 endpoints, so the slot's summary is in a second word.
    #[test]
    fn an_old_picker_never_loses_a_newer_endpoints_bit() {
        loom::model(|| {
            let index = Arc::new(LoadIndex::new(4097));
            let slot = 64 * 65 + 3;
            let old = index.advance_generation();
            // Left over from the slot's previous endpoint.
            index.insert(1, slot);
            let newer = {
                let index = Arc::clone(&index);
                thread::spawn(move || {
                    index.advance_generation();
                    let handle = reporting(&index, slot);
                    let guard = handle.dispatch();
                    (handle, guard)
                })
            };
            // The old picker's table has no endpoint in `slot`.
            let _ = index.find_lowest(0, old, None, |_, _, _| Verdict::Clear);
            let (handle, guard) = newer.join().unwrap();
            assert!(index.holds(1, slot), "the new endpoint's level is missing");
            drop(guard);
            drop(handle);
        });
    }

    /// A dispatch and its release race the activation of load reporting: activation only
    /// succeeds while nothing is in flight, so once all is done the index holds the endpoint
    /// at its count whichever came first, and the state (with its watch) is freed once.
    #[test]
    fn activation_races_a_request() {
        loom::model(|| {
            let index = Arc::new(LoadIndex::new(64));
            let handle = EndpointHandle::new(1);
            assert!(handle.install_watch(sink(&index), 0));
            let copy = handle.clone();
            let t = thread::spawn(move || {
                let guard = copy.dispatch();
                drop(copy);
                guard
            });
            let activated = handle.activate();
            if activated == Activation::Activated {
                index.insert(0, 0);
            }
            let guard = t.join().unwrap();
            if handle.is_reporting() {
                assert!(index.holds(1, 0), "the dispatch was not reported");
            } else {
                assert_eq!(activated, Activation::Busy);
            }
            drop(guard);
            if !handle.is_reporting() {
                assert_eq!(handle.activate(), Activation::Activated);
                index.insert(0, 0);
            }
            assert!(index.holds(0, 0), "the release was not reported");
            assert!(!handle.install_watch(sink(&index), 1));
            drop(handle);
        });
    }

    /// The request path activates an endpoint that was busy when its picker was built, while
    /// a newer picker's build activates it too and a request is dispatched to it: one
    /// activation wins, and the index ends with the endpoint at its count.
    #[test]
    fn request_path_activation_races_a_picker_build() {
        loom::model(|| {
            let index = Arc::new(LoadIndex::new(64));
            let handle = EndpointHandle::new(1);
            assert!(handle.install_watch(sink(&index), 5));
            let build = {
                let (index, handle) = (Arc::clone(&index), handle.clone());
                thread::spawn(move || match handle.activate() {
                    Activation::Activated => index.insert(0, 5),
                    Activation::AlreadyActive => index.insert(handle.in_flight(), 5),
                    Activation::Busy => {}
                })
            };
            let request = {
                let handle = handle.clone();
                thread::spawn(move || handle.dispatch())
            };
            // The request path: an idle pending endpoint is activated by the pick.
            if handle.in_flight() == 0 && handle.activate() == Activation::Activated {
                index.insert(0, 5);
            }
            build.join().unwrap();
            let guard = request.join().unwrap();
            if handle.is_reporting() {
                assert!(index.holds(1, 5), "the request's level is missing");
            }
            drop(guard);
            if handle.is_reporting() {
                assert!(index.holds(0, 5), "the release's level is missing");
            }
        });
    }

    /// Guards of a reporting endpoint are dropped on two threads while a third drops the last
    /// handle: each release reports before letting go, nothing is used after it is freed, the
    /// state is freed once (loom checks all three), and the index ends with the endpoint at 0.
    #[test]
    fn reporting_releases_race_the_last_handle() {
        loom::model(|| {
            let index = Arc::new(LoadIndex::new(64));
            let handle = reporting(&index, 3);
            let g1 = handle.dispatch();
            let g2 = handle.dispatch();
            assert!(index.holds(2, 3));
            let t1 = thread::spawn(move || drop(g1));
            let t2 = thread::spawn(move || drop(g2));
            let t3 = thread::spawn(move || drop(handle));
            t1.join().unwrap();
            t2.join().unwrap();
            t3.join().unwrap();
            assert!(index.holds(0, 3), "the last release was not reported");
        });
    }

    /// The discovery task allocates a slot in a full index while the last guard of a removed
    /// endpoint is dropped on the request path, freeing the endpoint and with it its slot:
    /// the slot is handed out at most once, either now or once it is free.
    #[test]
    fn slot_allocation_races_its_release_in_a_guards_drop() {
        loom::model(|| {
            let index = Arc::new(LoadIndex::new(64));
            for slot in 0..64 {
                assert_eq!(index.allocate_slot(), Some(slot));
            }
            let handle = reporting(&index, 7);
            let guard = handle.dispatch();
            drop(handle);
            let request = thread::spawn(move || drop(guard));
            let early = index.allocate_slot();
            request.join().unwrap();
            let late = index.allocate_slot();
            match (early, late) {
                (Some(7), None) | (None, Some(7)) => {}
                other => panic!("slot 7 handed out as {other:?}"),
            }
            assert_eq!(index.allocate_slot(), None);
        });
    }
}
