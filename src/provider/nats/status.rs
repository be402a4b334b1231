//! The status bucket: reading records many at a time, and a bounded cache of the records this
//! handle wrote, so the writer updates a status with one compare-and-set instead of a read and a
//! write.

use std::collections::{HashMap, VecDeque};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

use super::connection::{DirectGet, direct_get};
use super::layout::Layout;
use super::wire::{Record, Slot};
use crate::error::ProviderError;
use crate::event::EventId;

/// Reads the slots of `ids` from the status bucket, in order, keeping at most `window` reads in
/// flight.
pub(super) async fn read_slots(
    client: &async_nats::Client,
    layout: &Layout,
    operation: &'static str,
    window: usize,
    ids: &[EventId],
) -> Result<Vec<Slot>, ProviderError> {
    let mut slots = Vec::with_capacity(ids.len());
    let mut in_flight = FuturesOrdered::new();
    let read = |id: EventId| async move {
        let subject = layout.status_subject(id);
        let message = direct_get(client, operation, &layout.statuses, &DirectGet::last_on(&subject)).await?;
        Slot::read(message).map_err(|error| super::connection::backend(operation, error))
    };
    for &id in ids {
        if in_flight.len() >= window {
            if let Some(slot) = in_flight.next().await {
                slots.push(slot?);
            }
        }
        in_flight.push_back(read(id));
    }
    while let Some(slot) = in_flight.next().await {
        slots.push(slot?);
    }
    Ok(slots)
}

/// Records this handle wrote or read lately, with their revision: the expected revision of the
/// next compare-and-set. A stale entry costs one failed compare-and-set and a read, never a wrong
/// write. First in, first out; at most `capacity` entries.
#[derive(Debug)]
pub(super) struct RevisionCache {
    capacity: usize,
    entries: HashMap<EventId, (u64, Record), foldhash::fast::RandomState>,
    /// Insertion order, for eviction; may hold ids already forgotten.
    order: VecDeque<EventId>,
}

impl RevisionCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self { capacity, entries: HashMap::default(), order: VecDeque::new() }
    }

    pub(super) fn get(&self, id: EventId) -> Option<(u64, Record)> {
        self.entries.get(&id).cloned()
    }

    pub(super) fn put(&mut self, id: EventId, revision: u64, record: Record) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.insert(id, (revision, record)).is_none() {
            self.order.push_back(id);
        }
        while self.entries.len() > self.capacity {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.entries.remove(&oldest);
                }
                None => break,
            }
        }
        if self.order.len() > self.capacity.saturating_mul(2) {
            let entries = &self.entries;
            self.order.retain(|id| entries.contains_key(id));
        }
    }

    pub(super) fn forget(&mut self, id: EventId) {
        self.entries.remove(&id);
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventSource};

    fn record(seq: u64) -> Record {
        Record::new(seq, &Event::new(EventSource::System, "a.b"))
    }

    #[test]
    fn the_cache_keeps_the_newest_within_its_capacity() {
        let mut cache = RevisionCache::new(2);
        let ids: Vec<EventId> = (0..3).map(|_| EventId::new()).collect();
        cache.put(ids[0], 1, record(1));
        cache.put(ids[1], 2, record(2));
        cache.put(ids[0], 5, record(1)); // a newer revision of a cached id is no new entry
        assert_eq!(cache.get(ids[0]).map(|(rev, _)| rev), Some(5));
        cache.put(ids[2], 3, record(3));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(ids[0]).is_none(), "the first inserted goes first");
        cache.forget(ids[1]);
        assert!(cache.get(ids[1]).is_none());
        for round in 0..100 {
            let id = EventId::new();
            cache.put(id, round, record(round));
            cache.forget(id);
        }
        assert!(cache.order.len() <= 4, "forgotten ids do not pile up: {}", cache.order.len());
    }

    #[test]
    fn a_cache_of_zero_keeps_nothing() {
        let mut cache = RevisionCache::new(0);
        let id = EventId::new();
        cache.put(id, 1, record(1));
        assert!(cache.get(id).is_none());
    }
}
