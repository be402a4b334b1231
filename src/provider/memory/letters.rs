//! The memory provider's dead letters, in `(failed_at, id)` order, bounded by dropping the one that
//! failed earliest.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;

use crate::provider::{DeadLetter, DeadLetterFilter, DeadLetterId};

/// The stored dead letters, in `(failed_at, id)` order.
pub(super) struct LetterTable {
    by_time: BTreeMap<(Timestamp, DeadLetterId), DeadLetter>,
    failed_at: HashMap<DeadLetterId, Timestamp, foldhash::fast::RandomState>,
    pub(super) dropped: u64,
}

impl LetterTable {
    pub(super) fn new() -> Self {
        Self { by_time: BTreeMap::new(), failed_at: HashMap::default(), dropped: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.by_time.len()
    }

    pub(super) fn upsert(&mut self, letter: DeadLetter, max: usize) {
        if let Some(old) = self.failed_at.insert(letter.id, letter.failed_at) {
            self.by_time.remove(&(old, letter.id));
        }
        self.by_time.insert((letter.failed_at, letter.id), letter);
        while self.by_time.len() > max {
            if let Some(((_, id), _)) = self.by_time.pop_first() {
                self.failed_at.remove(&id);
                self.dropped += 1;
            }
        }
    }

    pub(super) fn get(&self, id: DeadLetterId) -> Option<&DeadLetter> {
        let failed_at = self.failed_at.get(&id)?;
        self.by_time.get(&(*failed_at, id))
    }

    pub(super) fn remove(&mut self, id: DeadLetterId) -> Option<DeadLetter> {
        let failed_at = self.failed_at.remove(&id)?;
        self.by_time.remove(&(failed_at, id))
    }

    pub(super) fn list(&self, filter: &DeadLetterFilter) -> Vec<DeadLetter> {
        self.by_time
            .values()
            .filter(|letter| filter.matches(letter))
            .skip(filter.offset)
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }
}
