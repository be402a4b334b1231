//! Status changes of one shard's events, kept beside its table and written without its lock.
//!
//! A broker's workers write the `processing` and `completed` statuses of events moments after a
//! publisher stored them. Written into the table, each would take the shard lock the publisher is
//! storing under and write entry lines the publisher has just written on its own core, which its
//! next stores must then fetch back. So a status change goes into the [`Mark`] of its entry's
//! slot instead: a line of its own, that only status writers write, under a lock of its own.
//!
//! A mark carries a number: its entry's, taken from the provider's store counter under the shard's
//! lock when the entry was stored or last moved (see [`super::table`]), so every entry that takes
//! a slot has a higher number than those that held it before. Readers of the table (under the
//! shard's lock) apply a mark to its entry only when the numbers agree. A worker writes with the
//! ticket of the event's store, the slot and number it was stored with, and without the shard's
//! lock ([`Marks::write`]): a mark with a lower number is its own, not yet written, and is taken
//! over; one with a higher number, or closed because its entry moved, refuses the write, and the
//! worker writes by id instead, under the shard's lock ([`Marks::claim`]), which finds the entry
//! where it is now, or nowhere when it was evicted or stored again. A late write therefore never
//! changes another event, and a write for an event that moved follows it.
//!
//! The marks of a slot are allocated, in chunks of [`CHUNK`], by the first store into it, and
//! kept until the provider is dropped: a shard's marks take 64 bytes for each slot its ring has
//! reached, and nothing for a bound it never reaches.

use std::mem;
use std::sync::OnceLock;

use jiff::Timestamp;

use super::table::Lifecycle;
use crate::event::EventStatus;
use crate::provider::StatusUpdate;
use crate::sync::{AtomicBool, AtomicU64, Ordering, UnsafeCell};

/// Marks allocated at once.
const CHUNK: usize = 256;

/// Marks past the one written that a ticketed write prefetches (see [`Marks::write`]).
const MARKS_AHEAD: usize = 2;

/// Segments of a shard's chunk directory: segment `k` holds `2^k` chunks, so this many cover
/// every chunk a `usize` slot can fall in (see [`chunk_of`]).
const SEGMENTS: usize = (usize::BITS - CHUNK.trailing_zeros() + 1) as usize;

/// A segment of the chunk directory: its chunks, each allocated by the first store into it.
type Segment = Box<[OnceLock<Box<[Mark]>>]>;

/// The marks of one shard's slots. Nothing is allocated ahead of the stores that reach a slot,
/// whatever the bound: chunks of [`CHUNK`] marks, found through segments of doubling size (the
/// chunk numbered `c` in segment `log2(c + 1)`), so the directory takes room in proportion to
/// the highest slot stored into, and a lookup is two loads.
pub(super) struct Marks {
    segments: [OnceLock<Segment>; SEGMENTS],
    /// The number of the latest entry moved to another slot (see [`Marks::moving`]), 0 for none:
    /// an entry numbered above it has not moved since.
    moved: AtomicU64,
}

/// The segment of the chunk `slot` falls in, and the chunk's place in it.
fn chunk_of(slot: usize) -> (usize, usize) {
    // At most `usize::MAX / CHUNK + 1`: no overflow.
    let n = slot / CHUNK + 1;
    let segment = n.ilog2() as usize;
    (segment, n - (1 << segment))
}

impl Marks {
    /// Marks for a shard, none allocated yet.
    pub(super) fn new() -> Self {
        Self { segments: std::array::from_fn(|_| OnceLock::new()), moved: AtomicU64::new(0) }
    }

    /// Allocates the mark of `slot`, if it is not yet: called by a store into the slot, before
    /// anybody is told of it.
    pub(super) fn reserve(&self, slot: usize) {
        let (segment, chunk) = chunk_of(slot);
        let chunks =
            self.segments[segment].get_or_init(|| (0..1usize << segment).map(|_| OnceLock::new()).collect());
        chunks[chunk].get_or_init(|| (0..CHUNK).map(|_| Mark::default()).collect());
    }

    /// The mark of `slot`, `None` when no store into it ever reserved it.
    pub(super) fn get(&self, slot: usize) -> Option<&Mark> {
        let (segment, chunk) = chunk_of(slot);
        self.segments[segment].get()?[chunk].get().map(|chunk| &chunk[slot % CHUNK])
    }

    /// Writes `update` for the entry numbered `number` in `slot`, without the shard's lock (a
    /// ticket's write). `false` when the entry may have moved to another slot since: the caller
    /// then writes by id. The mark takes the write when it is this entry's, or an earlier
    /// entry's (this one's first write), or closed by an entry that moved out before this one
    /// took its number. A mark closed since, or taken by a later entry, refuses it: when no entry
    /// has moved since this one took its number, this one was evicted, removed or stored again,
    /// and the write is dropped (`true`); else it may have moved.
    pub(super) fn write(&self, slot: usize, number: u64, update: &StatusUpdate) -> bool {
        // Relaxed: `moving` stores before the moves close any mark, under the mark's lock, which
        // this write takes after (or finds the mark not closed by them).
        let moved_since = || self.moved.load(Ordering::Relaxed) > number;
        let Some(mark) = self.get(slot) else { return !moved_since() };
        self.prefetch_after(slot);
        let mut error = Marked::error_of(update);
        let taken = mark.with(|marked| {
            if marked.store == MOVED {
                if moved_since() {
                    return false;
                }
            } else if marked.store > number {
                return !moved_since();
            }
            marked.record(number, update, &mut error);
            true
        });
        // The error text the write replaced, or the one it did not write, freed after the lock.
        drop(error);
        taken
    }

    /// Brings the marks of the slots after `slot` into cache: a shard's stores take its slots in
    /// order, so the next tickets a worker writes with are mostly for the slots just after, whose
    /// marks were last written a ring's length of stores ago and are cold by now. A read hint, not
    /// a write one: with two workers, the next slot's event may be the other's, and a line only
    /// read comes in exclusive when no other core holds it, so the write finds it ready anyway.
    fn prefetch_after(&self, slot: usize) {
        for next in slot + 1..=slot + MARKS_AHEAD {
            if let Some(mark) = self.get(next) {
                crate::prefetch::range(std::ptr::from_ref(mark).cast(), size_of::<Mark>());
            }
        }
    }

    /// Notes that entries are about to move to other slots, the latest with number `number` (the
    /// moves' numbers are fresh: above every entry's before them). Called under the shard's write
    /// lock, before the moves close any mark.
    pub(super) fn moving(&self, number: u64) {
        // Relaxed: see `write`.
        self.moved.store(number, Ordering::Relaxed);
    }

    /// Writes `update` for the entry numbered `number` in `slot`, found there under the shard's
    /// lock (which keeps it there): the mark is its own, an earlier entry's, or closed by the
    /// entry that held the slot before.
    pub(super) fn claim(&self, slot: usize, number: u64, update: &StatusUpdate) {
        if let Some(mark) = self.get(slot) {
            let mut error = Marked::error_of(update);
            mark.with(|marked| {
                debug_assert!(
                    marked.store <= number || marked.store == MOVED,
                    "no later entry's mark while this one holds the slot"
                );
                marked.record(number, update, &mut error);
            });
        }
    }

    /// Closes the mark of the entry numbered `number` as it moves out of `slot` (under the
    /// shard's write lock): every ticketed write to it is refused from now on. Returns what was
    /// written for the entry, for [`Marks::open`].
    pub(super) fn close(&self, slot: usize, number: u64) -> Option<Marked> {
        let mark = self.get(slot)?;
        mark.with(|marked| {
            let written = marked.holds(number).then(|| mem::take(marked));
            marked.store = MOVED;
            written
        })
    }

    /// Opens the mark of `slot` for the entry moving in with number `number` (under the shard's
    /// write lock), holding `written`: what [`Marks::close`] took from its former slot, or nothing
    /// (the entry's status is as stored). The slot's mark must be reserved.
    pub(super) fn open(&self, slot: usize, number: u64, written: Option<Marked>) {
        if let Some(mark) = self.get(slot) {
            let mut opened = written.unwrap_or_default();
            opened.store = number;
            // What the mark held is dropped after the lock.
            drop(mark.with(|marked| mem::replace(marked, opened)));
        }
    }

    /// The status marked for the entry numbered `store` in `slot`, if any.
    pub(super) fn status(&self, slot: usize, store: u64) -> Option<EventStatus> {
        self.get(slot).and_then(|mark| mark.with(|marked| marked.holds(store).then_some(marked.status)))
    }

    /// `status` (an entry's as stored, its mark numbered `store`) with the change marked for it,
    /// if any.
    pub(super) fn apply(&self, slot: usize, store: u64, status: &mut Lifecycle) {
        if let Some(mark) = self.get(slot) {
            mark.apply(store, status);
        }
    }
}

/// The status change written for one slot, on a cache line of its own, under a lock of its own.
///
/// The lock is a flag rather than a `Mutex`: what it guards is a few copies (no allocation, no
/// call out, save a failed event's error text read by a reader), so a writer that finds it taken
/// spins a moment, and letting go of it is a plain store. A `Mutex`'s unlock is a second locked
/// instruction, which took as long as the lock itself: a third of a worker's status path.
#[repr(align(64))]
pub(crate) struct Mark {
    locked: AtomicBool,
    marked: UnsafeCell<Marked>,
}

// SAFETY: `marked` is reached only in `Mark::holding`, by the one thread holding `locked`.
unsafe impl Sync for Mark {}

impl Default for Mark {
    fn default() -> Self {
        Self { locked: AtomicBool::new(false), marked: UnsafeCell::new(Marked::default()) }
    }
}

/// Spins a thread waiting for a mark's lock makes before it yields its core instead: the holder
/// may have been preempted.
const SPINS: u32 = 64;

// (loom's atomics and cells are larger.)
#[cfg(all(target_pointer_width = "64", not(eventbroker_loom)))]
const _: () = assert!(size_of::<Mark>() == 64, "a mark fills one cache line");

/// What the status updates of one entry changed, as one update would: the latest status, error
/// text and retry count, and each timestamp that any of them set.
pub(super) struct Marked {
    /// The number of the entry the updates were written for: 0 for none, [`MOVED`] once closed.
    store: u64,
    /// `processed_at` and `completed_at`, each where its bit in `present` is set.
    at: [Timestamp; 2],
    present: u8,
    status: EventStatus,
    retry_count: u32,
    /// The error text; `None` for none.
    error: Option<ErrorText>,
}

/// A mark's error text: a thin pointer, so that the mark fits a line (few events fail).
#[allow(clippy::box_collection, reason = "a thin pointer, where a `String` takes three words")]
type ErrorText = Box<String>;

impl Default for Marked {
    fn default() -> Self {
        Self {
            store: 0,
            at: [Timestamp::UNIX_EPOCH; 2],
            present: 0,
            status: EventStatus::Pending,
            retry_count: 0,
            error: None,
        }
    }
}

/// The number of a closed mark, whose entry moved out: above every entry's.
const MOVED: u64 = u64::MAX;

const PROCESSED: u8 = 1;
const COMPLETED: u8 = 2;
/// Set by the first write for the entry: a mark opened for an entry with nothing written for it
/// changes nothing.
const WRITTEN: u8 = 4;

impl Marked {
    /// Whether it holds a change written for the entry numbered `store`.
    fn holds(&self, store: u64) -> bool {
        self.store == store && self.present & WRITTEN != 0
    }

    /// `update`'s error text as a mark holds it, allocated before the mark's lock is taken.
    fn error_of(update: &StatusUpdate) -> Option<ErrorText> {
        (!update.error.is_empty()).then(|| Box::new(update.error.clone()))
    }

    /// Records `update` for the entry numbered `store`, what was recorded for another entry
    /// forgotten. `error` is [`Marked::error_of`] the update; it leaves with the text it replaced,
    /// for the caller to free once the lock is released.
    fn record(&mut self, store: u64, update: &StatusUpdate, error: &mut Option<ErrorText>) {
        let marked = self;
        if marked.store != store {
            marked.store = store;
            marked.present = 0;
        }
        marked.present |= WRITTEN;
        marked.status = update.status;
        marked.retry_count = update.retry_count;
        mem::swap(&mut marked.error, error);
        for (bit, index, at) in [(PROCESSED, 0, update.processed_at), (COMPLETED, 1, update.completed_at)] {
            if let Some(at) = at {
                marked.at[index] = at;
                marked.present |= bit;
            }
        }
    }
}

impl Mark {
    /// Runs `f` on what the mark holds, under its lock.
    fn with<R>(&self, f: impl FnOnce(&mut Marked) -> R) -> R {
        let mut spins = 0;
        while !self.try_lock() {
            while self.locked.load(Ordering::Relaxed) {
                if spins < SPINS {
                    spins += 1;
                    crate::sync::hint::spin_loop();
                } else {
                    crate::sync::thread::yield_now();
                }
            }
        }
        // SAFETY: `try_lock` returned `true`: this thread holds the lock.
        unsafe { self.holding(f) }
    }

    /// Takes the lock if it is free.
    fn try_lock(&self) -> bool {
        // Acquire: pairs with the Release store in `Unlock::drop`; what the last holder wrote is
        // seen. Relaxed on failure: nothing is read.
        self.locked.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Runs `f` on what the mark holds, and lets go of the lock after it.
    ///
    /// # Safety
    /// The calling thread holds the lock: its [`Mark::try_lock`] returned `true`, and it has not
    /// let go of it since.
    unsafe fn holding<R>(&self, f: impl FnOnce(&mut Marked) -> R) -> R {
        let _unlock = Unlock(&self.locked);
        // SAFETY: the caller holds `locked`, which `_unlock` releases after this reference's last use.
        self.marked.with_mut(|marked| f(unsafe { &mut *marked }))
    }

    fn apply(&self, store: u64, status: &mut Lifecycle) {
        self.with(|marked| marked.apply(store, status));
    }

    /// Adds one to the retry count it holds, if its lock is free: for the loom model of the lock,
    /// whose threads try once rather than wait (loom cannot explore a wait that needs another
    /// thread to make progress).
    #[cfg(eventbroker_loom)]
    pub(crate) fn try_add_one(&self) -> bool {
        let locked = self.try_lock();
        if locked {
            // SAFETY: `try_lock` returned `true`: this thread holds the lock.
            unsafe { self.holding(|marked| marked.retry_count += 1) };
        }
        locked
    }

    /// The retry count it holds, if its lock is free: for the loom model of the lock.
    #[cfg(eventbroker_loom)]
    pub(crate) fn try_count(&self) -> Option<u32> {
        // SAFETY: `holding` runs only when `try_lock` returned `true`: this thread holds the lock.
        self.try_lock().then(|| unsafe { self.holding(|marked| marked.retry_count) })
    }
}

/// Lets go of a mark's lock when [`Mark::with`]'s `f` returns, or should it ever unwind.
struct Unlock<'a>(&'a AtomicBool);

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire compare-and-swap in `Mark::try_lock`.
        self.0.store(false, Ordering::Release);
    }
}

impl Marked {
    /// Applies what it holds for the entry numbered `store` to `status`.
    fn apply(&self, store: u64, status: &mut Lifecycle) {
        let marked = self;
        if !marked.holds(store) {
            return;
        }
        // As `Lifecycle::apply` applies the same updates one by one.
        status.status = marked.status;
        status.retry_count = marked.retry_count;
        match &marked.error {
            Some(error) => status.error = error.as_str().into(),
            None if !status.error.is_empty() => status.error = Box::default(),
            None => {}
        }
        if marked.present & PROCESSED != 0 {
            status.processed_at = Some(marked.at[0]);
        }
        if marked.present & COMPLETED != 0 {
            status.completed_at = Some(marked.at[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory numbers chunks in order without gaps: each segment `k` holds chunks
    /// `2^k - 1 ..= 2^(k+1) - 2`, and the last slot there is falls in the last segment.
    #[test]
    fn every_slot_has_one_place_in_the_directory() {
        let mut expected = (0, 0);
        for chunk in 0..5_000 {
            for slot in [chunk * CHUNK, chunk * CHUNK + CHUNK - 1] {
                assert_eq!(chunk_of(slot), expected, "slot {slot}");
            }
            expected = if expected.1 + 1 == 1 << expected.0 {
                (expected.0 + 1, 0)
            } else {
                (expected.0, expected.1 + 1)
            };
        }
        let (segment, chunk) = chunk_of(usize::MAX);
        assert_eq!(segment, SEGMENTS - 1);
        assert!(chunk < 1 << segment);
    }

    /// Only the chunks stores reach are allocated, however far apart: a mark far out is there
    /// once reserved, and its neighbours in other chunks are not.
    #[test]
    fn marks_are_allocated_where_stores_reach() {
        let marks = Marks::new();
        let far = 3 << 20;
        assert!(marks.get(far).is_none());
        marks.reserve(far);
        assert!(marks.get(far).is_some() && marks.get(far + 1).is_some());
        assert!(
            marks.get(far - CHUNK).is_none() && marks.get(far + CHUNK).is_none() && marks.get(0).is_none()
        );
        let update = StatusUpdate::new(crate::EventId::new(), EventStatus::Completed);
        assert!(marks.write(far, 7, &update));
        assert_eq!(marks.status(far, 7), Some(EventStatus::Completed));
        assert_eq!(marks.status(far, 8), None, "another store's mark");
    }

    /// A mark's lock keeps its holders apart: threads that each add to what one mark holds, many
    /// times over, lose none of their additions.
    #[test]
    fn a_marks_lock_admits_one_holder_at_a_time() {
        const THREADS: u32 = 4;
        const ROUNDS: u32 = 20_000;
        let mark = Mark::default();
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    for _ in 0..ROUNDS {
                        mark.with(|marked| {
                            // A read and a write apart, as a lost update would need.
                            let seen = marked.retry_count;
                            std::hint::black_box(&mut *marked);
                            marked.retry_count = seen + 1;
                        });
                    }
                });
            }
        });
        assert_eq!(mark.with(|marked| marked.retry_count), THREADS * ROUNDS);
    }
}
