//! Status cells: the status fields of stored events, kept outside their shard's lock, so a
//! broker's workers record an event's status with a few atomic writes instead of the shard's
//! lock and a hash lookup.
//!
//! Every recency-list slot of a shard has a [`Cell`] at a fixed address: cells live in segments of
//! doubling size, allocated when the shard first uses one of their slots and never moved. A cell's
//! state word packs
//! - the event's status (2 bits), which the per-status counts follow;
//! - `LOCKED`, held while the other fields are read or written (a few stores; never across a call
//!   that can block);
//! - `EXTERNAL`: the status fields other than the status itself live in the shard's entry, under
//!   the shard's lock, because they do not fit the cell (an error text, a time the cell's
//!   nanosecond counts cannot hold). Once set it stays until the slot is reused;
//! - the slot's generation, which removing the event from the slot advances: a [`StatusSlot`]
//!   handed out when the event was stored then no longer matches, and a late update of an evicted
//!   event changes nothing, as an update of an id no longer stored does.

use std::num::NonZeroU64;
use std::sync::OnceLock;

use jiff::Timestamp;

use crate::event::EventStatus;
use crate::provider::StatusUpdate;
use crate::sync::{AtomicU64, Ordering};
use crate::sync::{hint, thread};

const STATUS: u64 = 0b11;
const EXTERNAL: u64 = 1 << 2;
const LOCKED: u64 = 1 << 3;
const GENERATION_SHIFT: u32 = 8;
/// The generation of a cell never used.
const FIRST_GENERATION: u64 = 1;
/// A time the cell does not hold.
const NO_TIME: u64 = 1 << 63; // i64::MIN's bits

/// Where an event's status lives in a memory provider, as handed out when it was stored: a write
/// through it takes no shard lock and no lookup by id. Valid until the event is removed; after
/// that a write through it is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusSlot {
    pub(super) shard: u32,
    pub(super) slot: u32,
    pub(super) generation: NonZeroU64,
}

pub(super) const fn status_bits(status: EventStatus) -> u64 {
    match status {
        EventStatus::Pending => 0,
        EventStatus::Processing => 1,
        EventStatus::Completed => 2,
        EventStatus::Failed => 3,
    }
}

pub(super) const fn status_of(bits: u64) -> EventStatus {
    match bits & STATUS {
        0 => EventStatus::Pending,
        1 => EventStatus::Processing,
        2 => EventStatus::Completed,
        _ => EventStatus::Failed,
    }
}

/// A time as the cell holds it: nanoseconds since the Unix epoch, when they fit in an `i64`
/// (1677 to 2262).
fn encode(at: Option<Timestamp>) -> Option<u64> {
    match at {
        None => Some(NO_TIME),
        #[allow(clippy::cast_sign_loss, reason = "the bits are kept, and decoded back to i64")]
        Some(at) => i64::try_from(at.as_nanosecond()).ok().filter(|&n| n != i64::MIN).map(|n| n as u64),
    }
}

fn decode(bits: u64) -> Option<Timestamp> {
    #[allow(clippy::cast_possible_wrap, reason = "the bits of an i64, as `encode` stored them")]
    let nanos = bits as i64;
    (bits != NO_TIME).then(|| Timestamp::from_nanosecond(i128::from(nanos)).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The status fields an update writes, in the cell's encoding; `None` when they do not fit.
struct Encoded {
    retry_count: u64,
    processed_at: Option<u64>,
    completed_at: Option<u64>,
}

impl Encoded {
    fn of(update: &StatusUpdate) -> Option<Self> {
        if !update.error.is_empty() {
            return None;
        }
        let processed_at = match update.processed_at {
            None => None,
            at => Some(encode(at)?),
        };
        let completed_at = match update.completed_at {
            None => None,
            at => Some(encode(at)?),
        };
        Some(Self { retry_count: u64::from(update.retry_count), processed_at, completed_at })
    }
}

/// The status fields of one slot's event.
pub(super) struct Cell {
    state: AtomicU64,
    retry_count: AtomicU64,
    processed_at: AtomicU64,
    completed_at: AtomicU64,
}

/// What [`Cell::update`] did.
pub(super) enum Updated {
    /// Written; the event's status was `from`.
    Done { from: EventStatus },
    /// The slot's event is no longer the one the update was for.
    Gone,
    /// The update or the cell needs the shard's entry: take the shard's lock and update there.
    NeedsEntry,
}

impl Cell {
    fn new() -> Self {
        Self {
            state: AtomicU64::new(FIRST_GENERATION << GENERATION_SHIFT),
            retry_count: AtomicU64::new(0),
            processed_at: AtomicU64::new(NO_TIME),
            completed_at: AtomicU64::new(NO_TIME),
        }
    }

    /// The event's status, without locking: the one before or after an update in progress.
    pub(super) fn status(&self) -> EventStatus {
        // Acquire: pairs with the Release in `Guard::drop`.
        status_of(self.state.load(Ordering::Acquire))
    }

    /// Locks the cell; `None` when its generation is not `generation` (when given).
    fn lock(&self, generation: Option<u64>) -> Option<Guard<'_>> {
        let mut spins = 0_u32;
        loop {
            let state = self.state.load(Ordering::Relaxed);
            if generation.is_some_and(|g| state >> GENERATION_SHIFT != g) {
                return None;
            }
            if state & LOCKED == 0 {
                // Acquire: pairs with the Release in `Guard::drop`; the fields written under the
                // previous hold are visible.
                if self
                    .state
                    .compare_exchange_weak(state, state | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(Guard { cell: self, state });
                }
            } else if spins < 64 {
                // Held for a few stores by a thread that may have been descheduled meanwhile.
                spins += 1;
                hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }

    /// Locks the cell, whatever its generation: for the holder of its shard's lock.
    pub(super) fn lock_owned(&self) -> Guard<'_> {
        self.lock(None).expect("no generation to match")
    }

    /// Applies `update` if the cell still holds `generation` and the update fits it.
    pub(super) fn update(&self, generation: NonZeroU64, update: &StatusUpdate) -> Updated {
        let Some(encoded) = Encoded::of(update) else { return Updated::NeedsEntry };
        let Some(mut guard) = self.lock(Some(generation.get())) else { return Updated::Gone };
        if guard.is_external() {
            return Updated::NeedsEntry;
        }
        let from = guard.status();
        guard.write(&encoded, update.status);
        Updated::Done { from }
    }
}

/// A locked cell: the state it will be unlocked with, and its fields.
pub(super) struct Guard<'a> {
    cell: &'a Cell,
    /// The state to store on unlock (without `LOCKED`).
    state: u64,
}

impl Guard<'_> {
    pub(super) fn generation(&self) -> NonZeroU64 {
        NonZeroU64::new(self.state >> GENERATION_SHIFT).expect("generations start at 1")
    }

    pub(super) fn status(&self) -> EventStatus {
        status_of(self.state)
    }

    pub(super) fn is_external(&self) -> bool {
        self.state & EXTERNAL != 0
    }

    /// Ends the current event's tenure of the slot: writes through its [`StatusSlot`]s now fail.
    pub(super) fn retire(&mut self) {
        let next = (self.state >> GENERATION_SHIFT).wrapping_add(1).max(FIRST_GENERATION);
        self.state = (next << GENERATION_SHIFT) | (self.state & STATUS);
    }

    pub(super) fn set_status(&mut self, status: EventStatus) {
        self.state = (self.state & !STATUS) | status_bits(status);
    }

    /// Moves the fields to the shard's entry, from now on.
    pub(super) fn set_external(&mut self) {
        self.state |= EXTERNAL;
    }

    /// Writes `update` into the cell: `false`, the cell unchanged, when the cell is external or
    /// the update does not fit it.
    pub(super) fn apply(&mut self, update: &StatusUpdate) -> bool {
        let encoded = if self.is_external() { None } else { Encoded::of(update) };
        encoded.is_some_and(|encoded| {
            self.write(&encoded, update.status);
            true
        })
    }

    fn write(&mut self, encoded: &Encoded, status: EventStatus) {
        // Relaxed: the lock orders them.
        let cell = self.cell;
        cell.retry_count.store(encoded.retry_count, Ordering::Relaxed);
        if let Some(at) = encoded.processed_at {
            cell.processed_at.store(at, Ordering::Relaxed);
        }
        if let Some(at) = encoded.completed_at {
            cell.completed_at.store(at, Ordering::Relaxed);
        }
        self.set_status(status);
    }

    /// Clears the times, for an event stored with none.
    fn clear_times(&self) {
        self.cell.processed_at.store(NO_TIME, Ordering::Relaxed);
        self.cell.completed_at.store(NO_TIME, Ordering::Relaxed);
    }

    /// `(retry_count, processed_at, completed_at)` as the cell holds them (when not external).
    pub(super) fn fields(&self) -> (u32, Option<Timestamp>, Option<Timestamp>) {
        let cell = self.cell;
        let retries = u32::try_from(cell.retry_count.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        (
            retries,
            decode(cell.processed_at.load(Ordering::Relaxed)),
            decode(cell.completed_at.load(Ordering::Relaxed)),
        )
    }

    /// Takes a newly stored event's status fields (`StatusUpdate::from_event`): in the cell when
    /// they fit, else the cell is marked external. `true` when they fit.
    pub(super) fn store(&mut self, status: &StatusUpdate) -> bool {
        self.state &= !EXTERNAL;
        self.set_status(status.status);
        let Some(encoded) = Encoded::of(status) else {
            self.set_external();
            return false;
        };
        self.clear_times();
        self.write(&encoded, status.status);
        true
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // Release: publishes the fields written under the lock with the state.
        self.cell.state.store(self.state & !LOCKED, Ordering::Release);
    }
}

/// Stored events per status, for `stats`: striped by thread, so the threads that store events and
/// those that update their statuses each add to a cache line of their own.
pub(super) struct StatusCounts {
    stripes: Box<[crossbeam_utils::CachePadded<[AtomicU64; 4]>]>,
}

const STRIPES: usize = 16;

fn stripe() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

impl StatusCounts {
    pub(super) fn new() -> Self {
        Self { stripes: (0..STRIPES).map(|_| crossbeam_utils::CachePadded::default()).collect() }
    }

    /// One more event with `status` (`delta` 1) or one fewer (`delta` -1, as wrapping).
    fn add(&self, status: EventStatus, delta: u64) {
        // Relaxed: statistics; no other memory is published through them.
        let index = usize::try_from(status_bits(status)).expect("two bits");
        self.stripes[stripe()][index].fetch_add(delta, Ordering::Relaxed);
    }

    pub(super) fn stored(&self, status: EventStatus) {
        self.add(status, 1);
    }

    pub(super) fn removed(&self, status: EventStatus) {
        self.add(status, 1_u64.wrapping_neg());
    }

    pub(super) fn moved(&self, from: EventStatus, to: EventStatus) {
        if from != to {
            self.removed(from);
            self.stored(to);
        }
    }

    /// Adds changes gathered over a batch (see [`Moves`]).
    pub(super) fn apply(&self, moves: &Moves) {
        if moves.0 != [0; 4] {
            let stripe = &self.stripes[stripe()];
            for (count, &delta) in stripe.iter().zip(&moves.0).filter(|&(_, &d)| d != 0) {
                // Relaxed: see `add`.
                count.fetch_add(delta, Ordering::Relaxed);
            }
        }
    }

    /// Events with `status` now. Changes made while it sums may be half counted; a negative
    /// sum reads as 0.
    pub(super) fn count(&self, status: EventStatus) -> u64 {
        let index = usize::try_from(status_bits(status)).expect("two bits");
        let sum =
            self.stripes.iter().fold(0_u64, |sum, s| sum.wrapping_add(s[index].load(Ordering::Relaxed)));
        #[allow(clippy::cast_possible_wrap, reason = "a wrapping sum of signed changes")]
        let signed = sum as i64;
        u64::try_from(signed).unwrap_or(0)
    }
}

/// Status changes gathered over a batch, added to [`StatusCounts`] at its end: one atomic add per
/// status rather than two per update.
#[derive(Default)]
pub(super) struct Moves([u64; 4]);

impl Moves {
    pub(super) fn moved(&mut self, from: EventStatus, to: EventStatus) {
        let [from, to] = [from, to].map(|s| usize::try_from(status_bits(s)).expect("two bits"));
        self.0[from] = self.0[from].wrapping_sub(1);
        self.0[to] = self.0[to].wrapping_add(1);
    }
}

/// Cells in the first segment; segment `k` holds `FIRST << k`.
const FIRST: usize = 64;
const SEGMENTS: usize = (usize::BITS - FIRST.trailing_zeros()) as usize;

/// One shard's cells, by slot, at addresses that never change.
pub(super) struct Cells {
    segments: [OnceLock<Box<[Cell]>>; SEGMENTS],
}

impl Cells {
    pub(super) fn new() -> Self {
        Self { segments: std::array::from_fn(|_| OnceLock::new()) }
    }

    fn locate(slot: usize) -> (usize, usize) {
        let n = slot.checked_add(FIRST).expect("a slot index below usize::MAX - 64");
        let segment = (n.ilog2() - FIRST.ilog2()) as usize;
        (segment, n - (FIRST << segment))
    }

    /// The cell of `slot`, allocating its segment on first use.
    pub(super) fn ensure(&self, slot: usize) -> &Cell {
        let (segment, offset) = Self::locate(slot);
        let cells =
            self.segments[segment].get_or_init(|| (0..FIRST << segment).map(|_| Cell::new()).collect());
        &cells[offset]
    }

    /// The cell of `slot`, which must have been [`ensure`](Self::ensure)d.
    ///
    /// # Panics
    /// When it was not: a [`StatusSlot`] or an index out of step, a bug.
    pub(super) fn get(&self, slot: usize) -> &Cell {
        let (segment, offset) = Self::locate(slot);
        &self.segments[segment].get().expect("the cell of a slot in use")[offset]
    }
}

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use super::*;
    use crate::EventId;

    #[test]
    fn slots_map_to_distinct_cells_in_doubling_segments() {
        assert_eq!(Cells::locate(0), (0, 0));
        assert_eq!(Cells::locate(63), (0, 63));
        assert_eq!(Cells::locate(64), (1, 0));
        assert_eq!(Cells::locate(191), (1, 127));
        assert_eq!(Cells::locate(192), (2, 0));
        assert_eq!(Cells::locate(usize::MAX - FIRST), (SEGMENTS - 1, (FIRST << (SEGMENTS - 1)) - 1));
        let cells = Cells::new();
        let a: *const Cell = cells.ensure(70);
        let b: *const Cell = cells.ensure(71);
        assert_ne!(a, b);
        assert!(std::ptr::eq(a, cells.get(70)));
    }

    #[test]
    fn an_update_through_a_retired_generation_changes_nothing() {
        let cell = Cell::new();
        let id = EventId::new();
        let generation = {
            let mut guard = cell.lock_owned();
            assert!(guard.store(&StatusUpdate::new(id, EventStatus::Pending)));
            guard.generation()
        };
        let processing = StatusUpdate::new(id, EventStatus::Processing).with_processed_at(Timestamp::now());
        assert!(matches!(cell.update(generation, &processing), Updated::Done { from: EventStatus::Pending }));
        assert_eq!(cell.status(), EventStatus::Processing);
        cell.lock_owned().retire();
        let completed = StatusUpdate::new(id, EventStatus::Completed);
        assert!(matches!(cell.update(generation, &completed), Updated::Gone));
        assert_eq!(cell.status(), EventStatus::Processing);
    }

    #[test]
    fn an_error_or_an_unencodable_time_goes_to_the_entry() {
        let cell = Cell::new();
        let id = EventId::new();
        let generation = cell.lock_owned().generation();
        let failed = StatusUpdate::new(id, EventStatus::Failed).with_error("boom");
        assert!(matches!(cell.update(generation, &failed), Updated::NeedsEntry));
        let far = StatusUpdate::new(id, EventStatus::Completed).with_completed_at(Timestamp::MAX);
        assert!(matches!(cell.update(generation, &far), Updated::NeedsEntry));
        cell.lock_owned().set_external();
        let plain = StatusUpdate::new(id, EventStatus::Completed);
        assert!(matches!(cell.update(generation, &plain), Updated::NeedsEntry));
    }

    #[test]
    fn times_round_trip_through_the_cell_and_none_keeps_the_stored_one() {
        let cell = Cell::new();
        let id = EventId::new();
        let at = Timestamp::from_nanosecond(1_700_000_000_123_456_789).unwrap();
        let generation = {
            let mut guard = cell.lock_owned();
            guard.store(&StatusUpdate::new(id, EventStatus::Pending));
            guard.generation()
        };
        let processing =
            StatusUpdate::new(id, EventStatus::Processing).with_processed_at(at).with_retry_count(2);
        assert!(matches!(cell.update(generation, &processing), Updated::Done { .. }));
        let done = StatusUpdate::new(id, EventStatus::Completed).with_completed_at(at).with_retry_count(3);
        assert!(matches!(cell.update(generation, &done), Updated::Done { from: EventStatus::Processing }));
        assert_eq!(cell.lock_owned().fields(), (3, Some(at), Some(at)));
    }
}

/// One cell as its two sides use it, for the loom models in `loom-tests/tests/status_cell.rs`:
/// the holder of the shard's lock (storing, retiring, reading) and a worker writing through a
/// [`StatusSlot`]'s generation.
#[cfg(eventbroker_loom)]
pub struct CellModel(Cell);

#[cfg(eventbroker_loom)]
impl CellModel {
    /// A cell never used.
    #[allow(clippy::new_without_default, reason = "loom-tests only")]
    pub fn new() -> Self {
        Self(Cell::new())
    }

    /// Stores a new event with `status` and no times; returns the generation a slot carries.
    pub fn store(&self, status: EventStatus) -> u64 {
        let mut guard = self.0.lock_owned();
        guard.store(&StatusUpdate::new(crate::EventId::new(), status));
        guard.generation().get()
    }

    /// Removes the event: writes through its generation are dropped from now on.
    pub fn retire(&self) {
        self.0.lock_owned().retire();
    }

    /// A worker's write of `status` with `retry_count` and a completion time of `nanos` after the
    /// epoch; `true` when it landed.
    pub fn update(&self, generation: u64, status: EventStatus, retry_count: u32, nanos: i64) -> bool {
        let at = Timestamp::from_nanosecond(i128::from(nanos)).expect("in range");
        let update = StatusUpdate::new(crate::EventId::new(), status)
            .with_retry_count(retry_count)
            .with_completed_at(at);
        let generation = NonZeroU64::new(generation).expect("generations start at 1");
        matches!(self.0.update(generation, &update), Updated::Done { .. })
    }

    /// `(status, retry_count, completed_at as nanoseconds)`, read under the lock.
    pub fn read(&self) -> (EventStatus, u32, Option<i128>) {
        let guard = self.0.lock_owned();
        let (retries, _, completed) = guard.fields();
        (guard.status(), retries, completed.map(Timestamp::as_nanosecond))
    }
}
