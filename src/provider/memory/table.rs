//! One shard of the memory provider's events: a recency list holding them, an index by id and an
//! index by sequence number, and the counts `stats` reports.
//!
//! The event is kept as it was stored (shared, never copied) and its status fields beside it, so a
//! status update writes a few fields instead of copying an event that handlers may still share.

use std::collections::VecDeque;
use std::sync::Arc;

use jiff::Timestamp;

use super::index::IdIndex;
use super::lru::Lru;
use crate::event::{Event, EventId, EventStatus};
use crate::pattern::Pattern;
use crate::provider::{EventFilter, ReplayFrom, StatusUpdate};

/// The status fields of a stored event, kept apart from the event itself.
#[derive(Debug, Clone)]
pub(super) struct Lifecycle {
    pub(super) status: EventStatus,
    /// A box rather than a `String`: the entry is kept to two cache lines, and few events fail.
    pub(super) error: Box<str>,
    pub(super) retry_count: u32,
    pub(super) processed_at: Option<Timestamp>,
    pub(super) completed_at: Option<Timestamp>,
}

impl Lifecycle {
    fn of(event: &Event) -> Self {
        Self {
            status: event.status,
            error: event.error.as_str().into(),
            retry_count: event.retry_count,
            processed_at: event.processed_at,
            completed_at: event.completed_at,
        }
    }

    /// The same semantics as [`StatusUpdate::apply_to`].
    fn apply(&mut self, update: &StatusUpdate) {
        self.status = update.status;
        if !(update.error.is_empty() && self.error.is_empty()) {
            self.error = update.error.as_str().into();
        }
        self.retry_count = update.retry_count;
        if let Some(at) = update.processed_at {
            self.processed_at = Some(at);
        }
        if let Some(at) = update.completed_at {
            self.completed_at = Some(at);
        }
    }
}

/// A status update as the provider keeps it until it is applied: with the number `next_seq` had
/// when the update was written, which tells the stores before it from those after it. (A broker's
/// worker gives one above the store numbers of the events it writes statuses of, which its jobs
/// carry, instead of reading `next_seq`: see `MemoryProvider::store_numbered`.)
///
/// One cache line (a [`StatusUpdate`] with the number took 104 bytes): workers write these and the
/// thread that applies them, usually a publisher on another core, reads them, so their size is
/// what travels between the cores for every status change.
pub(super) struct Pending {
    id: EventId,
    /// `next_seq` when the update was written: an entry whose latest store took this number or a
    /// later one was stored after the update and is not its target.
    written_at: u64,
    change: Change,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<Pending>() <= 64, "a waiting update fills one cache line");

/// What a waiting update changes.
enum Change {
    /// An update without error text, as the broker's own `processing` and `completed` ones are.
    Plain {
        /// `processed_at` and `completed_at`, each where its bit in `present` is set.
        at: [Timestamp; 2],
        present: u8,
        retry_count: u32,
        status: EventStatus,
    },
    /// Any other update, as written.
    Full(Box<StatusUpdate>),
}

const PROCESSED: u8 = 1;
const COMPLETED: u8 = 2;

impl Pending {
    pub(super) fn new(update: &StatusUpdate, written_at: u64) -> Self {
        let change = if update.error.is_empty() {
            let (processed, completed) = (update.processed_at, update.completed_at);
            Change::Plain {
                at: [processed, completed].map(|at| at.unwrap_or(Timestamp::UNIX_EPOCH)),
                present: (u8::from(processed.is_some()) * PROCESSED)
                    | (u8::from(completed.is_some()) * COMPLETED),
                retry_count: update.retry_count,
                status: update.status,
            }
        } else {
            Change::Full(Box::new(update.clone()))
        };
        Self { id: update.id, written_at, change }
    }
}

/// A status update on its way into a table: its event, when it was written, and what it changes.
pub(super) trait StatusChange {
    fn id(&self) -> EventId;
    /// `next_seq` when it was written (see [`Pending::written_at`]).
    fn written_at(&self) -> u64;
    fn apply_to(&self, status: &mut Lifecycle);
}

impl StatusChange for &Pending {
    fn id(&self) -> EventId {
        self.id
    }
    fn written_at(&self) -> u64 {
        self.written_at
    }
    /// The same semantics as [`Lifecycle::apply`], for an update without error text.
    fn apply_to(&self, status: &mut Lifecycle) {
        match &self.change {
            Change::Plain { at, present, retry_count, status: new } => {
                status.status = *new;
                if !status.error.is_empty() {
                    status.error = Box::default();
                }
                status.retry_count = *retry_count;
                if present & PROCESSED != 0 {
                    status.processed_at = Some(at[0]);
                }
                if present & COMPLETED != 0 {
                    status.completed_at = Some(at[1]);
                }
            }
            Change::Full(update) => status.apply(update),
        }
    }
}

impl StatusChange for (&StatusUpdate, u64) {
    fn id(&self) -> EventId {
        self.0.id
    }
    fn written_at(&self) -> u64 {
        self.1
    }
    fn apply_to(&self, status: &mut Lifecycle) {
        status.apply(self.0);
    }
}

/// One stored event: as stored, its status now, and its sequence number.
pub(super) struct Entry {
    /// The event's id, kept beside it: evicting reads it without touching the event itself,
    /// which by then is cold in cache.
    pub(super) id: EventId,
    pub(super) event: Arc<Event>,
    pub(super) status: Lifecycle,
    pub(super) seq: u64,
    /// The number its latest store took: `seq` for its first store, a fresh one for a re-store.
    /// Status updates written before it (see [`Pending::written_at`]) do not apply.
    stored_at: u64,
}

// With its two links, an entry's node in the recency list fills two cache lines, no more: eviction
// prefetches it, and status updates write it.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<Entry>() <= 112, "an entry and its two links fit in 128 bytes");

impl Entry {
    /// An owned copy of the event with its current status.
    pub(super) fn to_event(&self) -> Event {
        let mut event = Event::clone(&self.event);
        let s = &self.status;
        event.status = s.status;
        (*s.error).clone_into(&mut event.error);
        event.retry_count = s.retry_count;
        event.processed_at = s.processed_at;
        event.completed_at = s.completed_at;
        event
    }

    fn matches(&self, filter: &EventFilter) -> bool {
        filter.matches_with_status(&self.event, self.status.status)
    }
}

/// Most updates [`EventTable::update`] takes at once.
pub(super) const UPDATES_AT_ONCE: usize = 64;

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

    /// Hints the CPU to bring the entries that evictions pop a few from now into cache (four
    /// share a cache line; the oldest events were numbered long ago and are cold).
    fn prefetch_front(&self) {
        if let Some(ahead) = self.entries.get(8) {
            crate::prefetch::range(std::ptr::from_ref(ahead).cast(), size_of::<(u64, usize)>());
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
    by_id: IdIndex,
    by_seq: SeqIndex,
    /// Stored events per status, indexed by [`status_index`].
    by_status: [u64; 4],
}

const fn status_index(status: EventStatus) -> usize {
    match status {
        EventStatus::Pending => 0,
        EventStatus::Processing => 1,
        EventStatus::Completed => 2,
        EventStatus::Failed => 3,
    }
}

impl EventTable {
    pub(super) fn new() -> Self {
        Self { lru: Lru::new(), by_id: IdIndex::new(), by_seq: SeqIndex::default(), by_status: [0; 4] }
    }

    pub(super) fn len(&self) -> usize {
        self.lru.len()
    }

    pub(super) fn count(&self, status: EventStatus) -> u64 {
        self.by_status[status_index(status)]
    }

    /// Stores `event` as the most recently used, with the number `next_seq()` gives (called
    /// once): a new id takes it as its sequence number. `true` when the id was not stored yet; a
    /// re-store keeps its sequence number and takes the new event and its status.
    pub(super) fn upsert(&mut self, event: &Arc<Event>, next_seq: impl FnOnce() -> u64) -> bool {
        // Before the probe: the counter's locked instruction waits for every earlier load, and the
        // probe's is often a cache miss.
        let seq = next_seq();
        // One probe of the index either way.
        let hash = self.by_id.hash(event.id);
        let lru = &self.lru;
        let new = match self.by_id.find_or_vacant(hash, |slot| lru.get(slot).id == event.id) {
            Ok(slot) => {
                let entry = self.lru.get_mut(slot);
                self.by_status[status_index(entry.status.status)] -= 1;
                entry.event = Arc::clone(event);
                entry.status = Lifecycle::of(event);
                entry.stored_at = seq;
                self.lru.touch(slot);
                false
            }
            Err(vacant) => {
                let slot = self.lru.push_front(Entry {
                    id: event.id,
                    event: Arc::clone(event),
                    status: Lifecycle::of(event),
                    seq,
                    stored_at: seq,
                });
                self.by_id.insert(vacant, slot);
                self.by_seq.push(seq, slot);
                true
            }
        };
        self.by_status[status_index(event.status)] += 1;
        new
    }

    /// The event with `id`, with its status, now the most recently used.
    pub(super) fn touch(&mut self, id: EventId) -> Option<Event> {
        let slot = self.slot_of(id)?;
        self.lru.touch(slot);
        Some(self.lru.get(slot).to_event())
    }

    /// Applies each of `updates` whose event is stored and was stored before the update was
    /// written, in order (a later update of an id wins).
    /// The index is probed for all of them, and their entries prefetched, before any is applied,
    /// so the cache misses of a batch overlap instead of following one another. Callers pass at
    /// most [`UPDATES_AT_ONCE`], which keeps what is prefetched in cache until it is used.
    ///
    /// Updates do not count as use: they are the broker's bookkeeping, written by its workers
    /// while publishers store, and moving the entry in the recency list would have every worker
    /// write the list head every publisher writes.
    pub(super) fn update<C: StatusChange>(&mut self, updates: impl Iterator<Item = C> + Clone) {
        const ABSENT: usize = usize::MAX;
        let hashes: smallvec::SmallVec<[u32; UPDATES_AT_ONCE]> =
            updates.clone().map(|change| self.by_id.hash(change.id())).collect();
        for &hash in &hashes {
            self.by_id.prefetch(hash);
        }
        // Matched on the hash alone, so that no entry is read before all are prefetched; the id
        // is confirmed below (a different id with the same hash is found again in full).
        let slots: smallvec::SmallVec<[usize; UPDATES_AT_ONCE]> =
            hashes.iter().map(|&hash| self.by_id.find(hash, |_| true).unwrap_or(ABSENT)).collect();
        for &slot in slots.iter().filter(|&&slot| slot != ABSENT) {
            self.lru.prefetch(slot);
        }
        debug_assert!(slots.len() <= UPDATES_AT_ONCE, "callers pass at most UPDATES_AT_ONCE");
        for (change, mut slot) in updates.zip(slots) {
            if slot != ABSENT && self.lru.get(slot).id != change.id() {
                slot = self.slot_of(change.id()).unwrap_or(ABSENT);
            }
            if slot == ABSENT {
                continue;
            }
            let entry = self.lru.get_mut(slot);
            if entry.stored_at >= change.written_at() {
                continue;
            }
            let status = &mut entry.status;
            self.by_status[status_index(status.status)] -= 1;
            change.apply_to(status);
            self.by_status[status_index(status.status)] += 1;
        }
    }

    /// The slot of the event with `id`.
    fn slot_of(&self, id: EventId) -> Option<usize> {
        self.by_id.find(self.by_id.hash(id), |slot| self.lru.get(slot).id == id)
    }

    /// Removes the event with `id` and returns it, for the caller to drop once it has released
    /// the shard (the last reference frees the event, whose memory is cold by then).
    pub(super) fn remove(&mut self, id: EventId) -> Option<Arc<Event>> {
        let slot = self.slot_of(id)?;
        Some(self.remove_slot(slot))
    }

    fn remove_slot(&mut self, slot: usize) -> Arc<Event> {
        // Found by slot, so no id is compared; the hash is computed from the entry's id, and the
        // entry is in cache already (eviction prefetched it; `remove` has just read it).
        let removed = self.by_id.remove(self.by_id.hash(self.lru.get(slot).id), slot);
        debug_assert!(removed, "every slot in the recency list has its index entry");
        let entry = self.lru.remove(slot);
        self.by_seq.remove(entry.seq);
        self.by_status[status_index(entry.status.status)] -= 1;
        entry.event
    }

    /// Evicts the least recently used event and returns it (see [`EventTable::remove`]), `None`
    /// when there was none.
    pub(super) fn evict_least_recent(&mut self) -> Option<Arc<Event>> {
        let slot = self.lru.back()?;
        Some(self.remove_slot(slot))
    }

    /// Brings what the next evictions touch into cache ahead of them: the least recently used
    /// event was stored a bound's worth of events ago and is cold by now, and evicting it reads
    /// its list node and its index bucket, and dropping it the whole event and its payload's
    /// allocation, and popping its sequence number reads the front of the sequence index. Each
    /// call moves three victims one stage on, so by its eviction each has had its node fetched
    /// two stores before, its event one store before and its index bucket and payload now.
    pub(super) fn prefetch_evictions(&self) {
        let Some(next) = self.lru.back() else { return };
        self.by_id.prefetch(self.by_id.hash(self.lru.get(next).id));
        self.by_seq.prefetch_front();
        if let Some(payload) = self.lru.get(next).event.payload_json() {
            // From the allocator's header just before the text.
            crate::prefetch::range(payload.as_ptr().wrapping_sub(16), 16 + payload.len().min(48));
        }
        let Some(after) = self.lru.newer(next) else { return };
        let event = Arc::as_ptr(&self.lru.get(after).event).cast::<u8>();
        // With the reference counts before the event.
        crate::prefetch::range(event.wrapping_sub(16), 16 + size_of::<Event>());
        if let Some(third) = self.lru.newer(after) {
            self.lru.prefetch(third);
        }
    }

    /// Ids of completed and failed events created before `cutoff`.
    pub(super) fn finished_before(&self, cutoff: Timestamp) -> Vec<EventId> {
        self.lru
            .iter()
            .filter(|entry| entry.status.status.is_terminal() && entry.event.created_at < cutoff)
            .map(|entry| entry.event.id)
            .collect()
    }

    /// The first `take` events `filter` selects (offset and limit aside), in `(created_at, id)`
    /// order, with their keys: this shard's part of a `list`.
    pub(super) fn list(&self, filter: &EventFilter, take: usize) -> Vec<((Timestamp, EventId), Event)> {
        let mut keys: Vec<((Timestamp, EventId), usize)> = self
            .lru
            .iter_slots()
            .filter(|(_, entry)| entry.matches(filter))
            .map(|(slot, entry)| ((entry.event.created_at, entry.event.id), slot))
            .collect();
        keys.sort_unstable_by_key(|(key, _)| *key);
        keys.into_iter().take(take).map(|(key, slot)| (key, self.lru.get(slot).to_event())).collect()
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
            .map(|(seq, slot)| (seq, self.lru.get(slot)))
            .filter(|(_, entry)| not_before.is_none_or(|at| entry.event.created_at >= at))
            .filter(|(_, entry)| pattern.is_none_or(|p| p.matches(&entry.event.event_type)))
            .take(limit)
            .map(|(seq, entry)| (seq, entry.to_event()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::iter;

    use proptest::prelude::*;

    use super::*;
    use crate::EventSource;

    /// A waiting update, however it is kept, changes an entry exactly as the update itself does:
    /// each timestamp alone, both, none, before 1970, past what 64 bits of nanoseconds hold, with
    /// and without error text, over an entry that had an error.
    #[test]
    fn a_waiting_update_applies_as_the_update_does() {
        let stamps = [
            Timestamp::UNIX_EPOCH,
            Timestamp::new(1_764_000_000, 123_456_789).unwrap(),
            Timestamp::new(-1, 1).unwrap(),
            Timestamp::new(-9_000_000_000, 999_999_999).unwrap(),
            Timestamp::MAX,
            Timestamp::MIN,
        ];
        let mut updates = Vec::new();
        for &at in &stamps {
            for (processed_at, completed_at) in
                [(Some(at), None), (None, Some(at)), (Some(at), Some(stamps[1]))]
            {
                for error in ["", "handler failed"] {
                    updates.push(StatusUpdate {
                        error: error.into(),
                        retry_count: 3,
                        processed_at,
                        completed_at,
                        ..StatusUpdate::new(EventId::new(), EventStatus::Failed)
                    });
                }
            }
        }
        updates.push(StatusUpdate::new(EventId::new(), EventStatus::Completed));
        let mut event = Event::new(EventSource::System, "model.x");
        event.error = "earlier".into();
        event.processed_at = Some(stamps[1]);
        for update in &updates {
            let mut expected = Lifecycle::of(&event);
            expected.apply(update);
            let mut kept = Lifecycle::of(&event);
            (&Pending::new(update, 7)).apply_to(&mut kept);
            assert_eq!(
                (kept.status, &*kept.error, kept.retry_count, kept.processed_at, kept.completed_at),
                (
                    expected.status,
                    &*expected.error,
                    expected.retry_count,
                    expected.processed_at,
                    expected.completed_at
                ),
                "{update:?}"
            );
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Store,
        Restore(usize),
        Get(usize),
        /// `true`: an update written before the event's latest store, which must not apply.
        Update(usize, bool),
        Remove(usize),
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Store),
            1 => any::<usize>().prop_map(Op::Restore),
            4 => any::<usize>().prop_map(Op::Get),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(i, stale)| Op::Update(i, stale)),
            1 => any::<usize>().prop_map(Op::Remove),
            2 => Just(Op::Evict),
        ]
    }

    proptest! {
        /// The table agrees with a model (a `VecDeque` in recency order of id, sequence number,
        /// status and the number its latest store took) after any mix of stores, re-stores, reads,
        /// status updates (some written before the latest store of their event, which do not
        /// apply), removals and evictions: recency order, each event's status, replay in sequence
        /// order, and the counts per status.
        #[test]
        fn matches_a_recency_model(ops in prop::collection::vec(op(), 0..600)) {
            let mut table = EventTable::new();
            let mut model: VecDeque<(EventId, u64, EventStatus, u64)> = VecDeque::new();
            let mut next_seq = 1;
            let mut take = || {
                next_seq += 1;
                next_seq - 1
            };
            for op in ops {
                match op {
                    Op::Store => {
                        let event = Arc::new(Event::new(EventSource::System, "model.x"));
                        let mut seq = 0;
                        let new = table.upsert(&event, || {
                            seq = take();
                            seq
                        });
                        prop_assert!(new);
                        model.push_back((event.id, seq, EventStatus::Pending, seq));
                    }
                    Op::Restore(i) if !model.is_empty() => {
                        let (id, seq, _, _) = model.remove(i % model.len()).unwrap();
                        let event = Arc::new(Event { id, ..Event::new(EventSource::System, "model.y") });
                        let mut stored = 0;
                        let new = table.upsert(&event, || {
                            stored = take();
                            stored
                        });
                        prop_assert!(!new);
                        model.push_back((id, seq, EventStatus::Pending, stored));
                    }
                    Op::Get(i) if !model.is_empty() => {
                        let entry = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(table.touch(entry.0).map(|e| (e.id, e.status)), Some((entry.0, entry.2)));
                        model.push_back(entry);
                    }
                    Op::Update(i, stale) if !model.is_empty() => {
                        let at = i % model.len();
                        let status = [EventStatus::Processing, EventStatus::Completed, EventStatus::Failed][i % 3];
                        let update = StatusUpdate::new(model[at].0, status);
                        if stale {
                            // Written when `next_seq` was the number the latest store took.
                            table.update(iter::once((&update, model[at].3)));
                        } else {
                            table.update(iter::once((&update, take())));
                            model[at].2 = status;
                        }
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let (id, _, _, _) = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(table.remove(id).map(|e| e.id), Some(id));
                        prop_assert!(table.remove(id).is_none());
                    }
                    Op::Evict => {
                        let evicted = table.evict_least_recent().map(|e| e.id);
                        prop_assert_eq!(evicted, model.pop_front().map(|(id, _, _, _)| id));
                    }
                    Op::Restore(_) | Op::Get(_) | Op::Update(..) | Op::Remove(_) => {}
                }
                prop_assert_eq!(table.len(), model.len());
                let held: Vec<_> = table.lru.oldest_first().map(|e| (e.id, e.seq, e.status.status)).collect();
                prop_assert_eq!(held, model.iter().map(|&(id, seq, status, _)| (id, seq, status)).collect::<Vec<_>>());
                let mut by_seq: Vec<_> = model.iter().map(|&(id, seq, _, _)| (seq, id)).collect();
                by_seq.sort_unstable();
                let replayed: Vec<_> =
                    table.replay(ReplayFrom::Beginning, None, usize::MAX).into_iter().map(|(seq, e)| (seq, e.id)).collect();
                prop_assert_eq!(replayed, by_seq);
                for status in [EventStatus::Pending, EventStatus::Processing, EventStatus::Completed, EventStatus::Failed] {
                    prop_assert_eq!(table.count(status), model.iter().filter(|e| e.2 == status).count() as u64);
                }
            }
        }
    }

    /// Two ids whose 32-bit hashes are equal share a probe sequence in the index; each is still
    /// updated, read, removed and evicted as itself, whichever of them an update names.
    #[test]
    fn ids_with_the_same_hash_are_told_apart() {
        let mut table = EventTable::new();
        let mut seen = HashMap::new();
        let (a, b) = loop {
            let id = EventId::new();
            if let Some(other) = seen.insert(table.by_id.hash(id), id) {
                break (other, id);
            }
        };
        let mut seq = 0;
        for id in [a, b] {
            let event = Arc::new(Event { id, ..Event::new(EventSource::System, "collide.x") });
            assert!(table.upsert(&event, || {
                seq += 1;
                seq
            }));
        }
        let later = seq + 1;
        for (id, status) in [(b, EventStatus::Completed), (a, EventStatus::Failed)] {
            let update = StatusUpdate::new(id, status);
            table.update(iter::once((&update, later)));
        }
        let status = |table: &mut EventTable, id| table.touch(id).map(|e| (e.id, e.status));
        assert_eq!(status(&mut table, a), Some((a, EventStatus::Failed)));
        assert_eq!(status(&mut table, b), Some((b, EventStatus::Completed)));
        assert_eq!((table.count(EventStatus::Failed), table.count(EventStatus::Completed)), (1, 1));

        assert_eq!(table.remove(a).map(|e| e.id), Some(a));
        assert_eq!(status(&mut table, a), None);
        assert_eq!(status(&mut table, b), Some((b, EventStatus::Completed)));
        assert_eq!(table.evict_least_recent().map(|e| e.id), Some(b));
        assert_eq!((table.len(), table.count(EventStatus::Completed)), (0, 0));
        assert_eq!(status(&mut table, b), None);
    }
}
