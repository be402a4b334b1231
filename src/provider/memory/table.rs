//! One shard of the memory provider's events: a recency list holding them, an index by id and an
//! index by sequence number, and the counts `stats` reports.
//!
//! The event is kept as it was stored (shared, never copied) and its status fields beside it, so a
//! status update writes a few fields instead of copying an event that handlers may still share.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::Arc;

use jiff::Timestamp;

use super::cells::{Cells, StatusCounts};
use super::lru::Lru;
use crate::event::{Event, EventId};
use crate::pattern::Pattern;
use crate::provider::{EventFilter, ReplayFrom, StatusUpdate};

/// The status fields of a stored event, when its cell cannot hold them (see [`cells`](super::cells)):
/// an error text, or a time outside what the cell holds.
#[derive(Debug, Clone, Default)]
pub(super) struct Lifecycle {
    error: String,
    retry_count: u32,
    processed_at: Option<Timestamp>,
    completed_at: Option<Timestamp>,
}

impl Lifecycle {
    /// The same semantics as [`StatusUpdate::apply_to`], the status aside (the cell holds it).
    fn apply(&mut self, update: &StatusUpdate) {
        self.error.clone_from(&update.error);
        self.retry_count = update.retry_count;
        if let Some(at) = update.processed_at {
            self.processed_at = Some(at);
        }
        if let Some(at) = update.completed_at {
            self.completed_at = Some(at);
        }
    }
}

/// One stored event: as stored, and its sequence number; its status is in its slot's cell.
pub(super) struct Entry {
    /// The event's id, kept beside it: evicting reads it without touching the event itself,
    /// which by then is cold in cache.
    pub(super) id: EventId,
    pub(super) event: Arc<Event>,
    /// The status fields, when the cell marks them external.
    external: Lifecycle,
    pub(super) seq: u64,
    /// When it was last used (stored or read), on the provider's clock: the recency that eviction
    /// compares across shards.
    stamp: u64,
}

/// Slot of a sequence index entry whose event is gone.
const GONE: usize = usize::MAX;

/// Sequence numbers of one shard, in increasing order (they are handed out under the shard's lock),
/// with the recency-list slot of each; removed events leave a tombstone until compaction, except at
/// the front, which is popped at once: eviction removes the oldest events, so in the broker's flow
/// (store, then status updates soon after) removal is O(1).
#[derive(Default)]
struct SeqIndex {
    entries: VecDeque<(u64, usize)>,
    gone: usize,
}

impl SeqIndex {
    fn push(&mut self, seq: u64, slot: usize) {
        debug_assert!(self.entries.back().is_none_or(|&(last, _)| last < seq), "sequence numbers increase");
        self.entries.push_back((seq, slot));
    }

    fn remove(&mut self, seq: u64) {
        if self.entries.front().is_some_and(|&(first, _)| first == seq) {
            self.entries.pop_front();
        } else if let Ok(i) = self.entries.binary_search_by_key(&seq, |&(s, _)| s) {
            self.entries[i].1 = GONE;
            self.gone += 1;
            if self.gone > 64 && self.gone * 2 > self.entries.len() {
                self.entries.retain(|&(_, slot)| slot != GONE);
                self.gone = 0;
            }
            return;
        }
        while self.entries.front().is_some_and(|&(_, slot)| slot == GONE) {
            self.entries.pop_front();
            self.gone -= 1;
        }
    }

    /// `(seq, slot)` from `first` on, in order.
    fn from(&self, first: u64) -> impl Iterator<Item = (u64, usize)> + '_ {
        let start = self.entries.partition_point(|&(s, _)| s < first);
        self.entries.range(start..).copied().filter(|&(_, slot)| slot != GONE)
    }
}

/// One shard's events.
pub(super) struct EventTable {
    lru: Lru<Entry>,
    by_id: HashMap<EventId, usize, foldhash::fast::RandomState>,
    by_seq: SeqIndex,
    /// The status of the event in each slot of `lru`.
    cells: Arc<Cells>,
    counts: Arc<StatusCounts>,
}

/// A newly stored event: where its status lives, and whether its id was new.
pub(super) struct Stored {
    pub(super) new: bool,
    pub(super) slot: usize,
    pub(super) generation: NonZeroU64,
}

impl EventTable {
    pub(super) fn new(cells: Arc<Cells>, counts: Arc<StatusCounts>) -> Self {
        Self { lru: Lru::new(), by_id: HashMap::default(), by_seq: SeqIndex::default(), cells, counts }
    }

    pub(super) fn len(&self) -> usize {
        self.lru.len()
    }

    /// Stores `event` as the most recently used, at `now` on the provider's clock; a new id gets
    /// the sequence number `next_seq()` gives (called only then). A re-store keeps its sequence
    /// number, its slot and its generation, and takes the new event and its status.
    pub(super) fn upsert(&mut self, event: &Arc<Event>, now: u64, next_seq: impl FnOnce() -> u64) -> Stored {
        let status = StatusUpdate::from_event(event);
        if let Some(&slot) = self.by_id.get(&event.id) {
            let entry = self.lru.get_mut(slot);
            let mut cell = self.cells.get(slot).lock_owned();
            self.counts.moved(cell.status(), event.status);
            entry.event = Arc::clone(event);
            entry.stamp = now;
            if !cell.store(&status) {
                entry.external = Lifecycle::default();
                entry.external.apply(&status);
            }
            let generation = cell.generation();
            drop(cell);
            self.lru.touch(slot);
            return Stored { new: false, slot, generation };
        }
        let seq = next_seq();
        let slot = self.lru.push_front(Entry {
            id: event.id,
            event: Arc::clone(event),
            external: Lifecycle::default(),
            seq,
            stamp: now,
        });
        let mut cell = self.cells.ensure(slot).lock_owned();
        if !cell.store(&status) {
            self.lru.get_mut(slot).external.apply(&status);
        }
        let generation = cell.generation();
        drop(cell);
        self.counts.stored(event.status);
        self.by_id.insert(event.id, slot);
        self.by_seq.push(seq, slot);
        Stored { new: true, slot, generation }
    }

    /// The event with `id`, with its status, now the most recently used, at `now` on the
    /// provider's clock.
    pub(super) fn touch(&mut self, id: EventId, now: u64) -> Option<Event> {
        let slot = *self.by_id.get(&id)?;
        self.lru.get_mut(slot).stamp = now;
        self.lru.touch(slot);
        Some(self.to_event(slot))
    }

    /// When the least recently used event was last used; `None` when there is none.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.lru.back().map(|slot| self.lru.get(slot).stamp)
    }

    /// An owned copy of the event in `slot` with its current status.
    fn to_event(&self, slot: usize) -> Event {
        let entry = self.lru.get(slot);
        let mut event = Event::clone(&entry.event);
        let cell = self.cells.get(slot).lock_owned();
        event.status = cell.status();
        if cell.is_external() {
            let s = &entry.external;
            event.error.clone_from(&s.error);
            (event.retry_count, event.processed_at, event.completed_at) =
                (s.retry_count, s.processed_at, s.completed_at);
        } else {
            event.error.clear();
            (event.retry_count, event.processed_at, event.completed_at) = cell.fields();
        }
        event
    }

    /// Applies `update` when its event is stored. It does not count as use: status updates are the
    /// broker's bookkeeping, written by its workers while publishers store, and moving the entry in
    /// the recency list would have every worker write the list head every publisher writes.
    pub(super) fn update(&mut self, update: &StatusUpdate) {
        let Some(&slot) = self.by_id.get(&update.id) else { return };
        self.update_slot(slot, None, update);
    }

    /// Applies `update` to the event in `slot`, if the slot still holds `generation` (when given).
    pub(super) fn update_slot(&mut self, slot: usize, generation: Option<NonZeroU64>, update: &StatusUpdate) {
        let mut cell = self.cells.get(slot).lock_owned();
        if generation.is_some_and(|g| g != cell.generation()) {
            return;
        }
        let from = cell.status();
        if !cell.apply(update) {
            let external = &mut self.lru.get_mut(slot).external;
            if !cell.is_external() {
                // The cell's fields move to the entry, which holds them from now on.
                let (retry_count, processed_at, completed_at) = cell.fields();
                *external = Lifecycle { error: String::new(), retry_count, processed_at, completed_at };
                cell.set_external();
            }
            external.apply(update);
            cell.set_status(update.status);
        }
        drop(cell);
        self.counts.moved(from, update.status);
    }

    pub(super) fn remove(&mut self, id: EventId) -> Option<Entry> {
        let slot = self.by_id.remove(&id)?;
        let entry = self.lru.remove(slot);
        self.by_seq.remove(entry.seq);
        let mut cell = self.cells.get(slot).lock_owned();
        let status = cell.status();
        cell.retire();
        drop(cell);
        self.counts.removed(status);
        Some(entry)
    }

    /// Evicts the least recently used event; `false` when there was none.
    pub(super) fn evict_least_recent(&mut self) -> bool {
        let Some(slot) = self.lru.back() else { return false };
        let id = self.lru.get(slot).id;
        self.remove(id).is_some()
    }

    /// Ids of completed and failed events created before `cutoff`.
    pub(super) fn finished_before(&self, cutoff: Timestamp) -> Vec<EventId> {
        self.lru
            .iter_slots()
            .filter(|(slot, entry)| {
                self.cells.get(*slot).status().is_terminal() && entry.event.created_at < cutoff
            })
            .map(|(_, entry)| entry.id)
            .collect()
    }

    /// The first `take` events `filter` selects (offset and limit aside), in `(created_at, id)`
    /// order, with their keys: this shard's part of a `list`.
    pub(super) fn list(&self, filter: &EventFilter, take: usize) -> Vec<((Timestamp, EventId), Event)> {
        let mut keys: Vec<((Timestamp, EventId), usize)> = self
            .lru
            .iter_slots()
            .filter(|(slot, entry)| filter.matches_with_status(&entry.event, self.cells.get(*slot).status()))
            .map(|(slot, entry)| ((entry.event.created_at, entry.event.id), slot))
            .collect();
        keys.sort_unstable_by_key(|(key, _)| *key);
        keys.into_iter().take(take).map(|(key, slot)| (key, self.to_event(slot))).collect()
    }

    /// Up to `limit` events from `from` on, whose type matches `pattern`, in sequence order.
    pub(super) fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Vec<(u64, Event)> {
        let (first_seq, not_before) = match from {
            ReplayFrom::Beginning => (0, None),
            ReplayFrom::Sequence(seq) => (seq, None),
            ReplayFrom::Time(at) => (0, Some(at)),
        };
        self.by_seq
            .from(first_seq)
            .filter(|&(_, slot)| {
                let event = &self.lru.get(slot).event;
                not_before.is_none_or(|at| event.created_at >= at)
                    && pattern.is_none_or(|p| p.matches(&event.event_type))
            })
            .take(limit)
            .map(|(seq, slot)| (seq, self.to_event(slot)))
            .collect()
    }
}
