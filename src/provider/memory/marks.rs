//! Status changes of one shard's events, kept beside its table and written without its lock.
//!
//! A broker's workers write the `processing` and `completed` statuses of events moments after a
//! publisher stored them. Written into the table, each would take the shard lock the publisher is
//! storing under and write entry lines the publisher has just written on its own core, which its
//! next stores must then fetch back. So a status change goes into the [`Mark`] of its entry's
//! slot instead: a line of its own, that only status writers write, under a lock of its own. The
//! mark carries the number of the store it belongs to; readers of the table (under the shard's
//! lock) apply a mark to its entry only when the entry's latest store took that number. A mark
//! left by an evicted or re-stored event is thus ignored, and a late write for it never overwrites
//! the mark of a later store.
//!
//! Slots are the recency list's, which the table reuses after a removal; a mark of a slot whose
//! entry changed is stale by its number, never wrong. The marks of a slot are allocated, in chunks
//! of [`CHUNK`], by the first store into it, and kept until the provider is dropped: a shard's
//! marks take 64 bytes for each event it has held at once.

use std::sync::OnceLock;

use jiff::Timestamp;
use parking_lot::Mutex;

use super::table::Lifecycle;
use crate::event::EventStatus;
use crate::provider::StatusUpdate;

/// Marks allocated at once.
const CHUNK: usize = 256;

/// The marks of one shard's slots.
pub(super) struct Marks {
    chunks: Box<[OnceLock<Box<[Mark]>>]>,
}

impl Marks {
    /// Marks for up to `slots` slots, none allocated yet.
    pub(super) fn new(slots: usize) -> Self {
        Self { chunks: (0..slots.div_ceil(CHUNK)).map(|_| OnceLock::new()).collect() }
    }

    /// Allocates the mark of `slot`, if it is not yet: called by a store into the slot, before
    /// anybody is told of it.
    pub(super) fn reserve(&self, slot: usize) {
        if let Some(chunk) = self.chunks.get(slot / CHUNK) {
            chunk.get_or_init(|| (0..CHUNK).map(|_| Mark::default()).collect());
        }
    }

    /// The mark of `slot`, `None` when no store into it ever reserved it (or beyond the bound).
    pub(super) fn get(&self, slot: usize) -> Option<&Mark> {
        self.chunks.get(slot / CHUNK)?.get().map(|chunk| &chunk[slot % CHUNK])
    }

    /// Writes `update` to the entry in `slot` whose latest store took number `store`; ignored
    /// when the mark already holds a later store's status (the entry changed since).
    pub(super) fn write(&self, slot: usize, store: u64, update: &StatusUpdate) {
        if let Some(mark) = self.get(slot) {
            mark.write(store, update);
        }
    }

    /// The status marked for the store numbered `store` into `slot`, if any.
    pub(super) fn status(&self, slot: usize, store: u64) -> Option<EventStatus> {
        self.get(slot).and_then(|mark| {
            let marked = mark.0.lock();
            (marked.store == store).then_some(marked.status)
        })
    }

    /// `status` (an entry's as stored, whose latest store took number `store`) with the change
    /// marked for that store, if any.
    pub(super) fn apply(&self, slot: usize, store: u64, status: &mut Lifecycle) {
        if let Some(mark) = self.get(slot) {
            mark.apply(store, status);
        }
    }
}

/// The status change written for one slot, on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
pub(super) struct Mark(Mutex<Marked>);

#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<Mark>() == 64, "a mark fills one cache line");

/// What the status updates of one store changed, as one update would: the latest status, error
/// text and retry count, and each timestamp that any of them set.
struct Marked {
    /// The number of the store the updates were written for; 0 for none.
    store: u64,
    /// `processed_at` and `completed_at`, each where its bit in `present` is set.
    at: [Timestamp; 2],
    present: u8,
    status: EventStatus,
    retry_count: u32,
    /// The error text; `None` for none. A thin pointer, so that the mark fits a line: few events
    /// fail.
    #[allow(clippy::box_collection, reason = "a thin pointer, where a `String` takes three words")]
    error: Option<Box<String>>,
}

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

const PROCESSED: u8 = 1;
const COMPLETED: u8 = 2;

impl Mark {
    fn write(&self, store: u64, update: &StatusUpdate) {
        let mut marked = self.0.lock();
        if marked.store > store {
            return;
        }
        if marked.store < store {
            marked.store = store;
            marked.present = 0;
        }
        marked.status = update.status;
        marked.retry_count = update.retry_count;
        marked.error = (!update.error.is_empty()).then(|| Box::new(update.error.clone()));
        for (bit, index, at) in [(PROCESSED, 0, update.processed_at), (COMPLETED, 1, update.completed_at)] {
            if let Some(at) = at {
                marked.at[index] = at;
                marked.present |= bit;
            }
        }
    }

    fn apply(&self, store: u64, status: &mut Lifecycle) {
        let marked = self.0.lock();
        if marked.store != store {
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
