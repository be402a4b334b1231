//! Slots by event id, for one shard of the memory provider: an open-addressing hash table of
//! `(hash, slot)` pairs in eight bytes each, probed linearly, whose bucket for an id is known
//! before it is probed, so the shard can bring it into cache ahead of time.
//!
//! The ids live in the entries, where a match of the hash is confirmed; the index itself is small
//! enough to stay in cache while the events stream through it. What makes it the provider's own
//! rather than a general-purpose table is [`IdIndex::prefetch`]: every store inserts an id and
//! evicts another, both at buckets as random as the ids, and with nothing to fetch them early
//! each was a cache miss the storing thread waited for. An id's bucket is its hash's low bits,
//! and a probe that starts there nearly always ends in the same cache line (the table is at most
//! three quarters full), so one hint covers it. Removal shifts the entries after the removed one
//! back (no tombstones), so probe lengths never grow with churn.

use std::hash::BuildHasher;

use crate::event::EventId;

/// The bucket of no entry. A full bucket holds `(hash << 32) | (slot + 1)`, never 0.
const EMPTY: u64 = 0;

/// Buckets of the first allocation.
const MIN_BUCKETS: usize = 16;

pub(super) struct IdIndex {
    /// A power of two in number, or none before the first insert.
    buckets: Box<[u64]>,
    len: usize,
    state: foldhash::fast::RandomState,
}

impl IdIndex {
    pub(super) fn new() -> Self {
        Self { buckets: Box::default(), len: 0, state: foldhash::fast::RandomState::default() }
    }

    /// `id`'s hash: 32 bits of a seeded hash (ids come from outside; a fixed hash could be
    /// flooded).
    pub(super) fn hash(&self, id: EventId) -> u32 {
        #[allow(clippy::cast_possible_truncation, reason = "the high half of the hash")]
        let high = (self.state.hash_one(id) >> 32) as u32;
        high
    }

    /// Hints the CPU to bring the bucket a probe for `hash` starts at into cache.
    #[inline]
    pub(super) fn prefetch(&self, hash: u32) {
        if !self.buckets.is_empty() {
            let bucket = &self.buckets[self.home(hash)];
            crate::prefetch::range(std::ptr::from_ref(bucket).cast(), size_of::<u64>());
        }
    }

    /// The slot of the entry with `hash` for which `is` holds.
    pub(super) fn find(&self, hash: u32, mut is: impl FnMut(usize) -> bool) -> Option<usize> {
        self.probe(hash, &mut is).ok().map(|(_, slot)| slot)
    }

    /// The slot of the entry with `hash` for which `is` holds, or else a place to insert one.
    pub(super) fn find_or_vacant(
        &mut self,
        hash: u32,
        mut is: impl FnMut(usize) -> bool,
    ) -> Result<usize, Vacant> {
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            self.grow();
        }
        match self.probe(hash, &mut is) {
            Ok((_, slot)) => Ok(slot),
            Err(bucket) => Err(Vacant { bucket, hash }),
        }
    }

    /// Adds `slot` where `vacant` was found; no other change may come between.
    ///
    /// # Panics
    /// When `slot` is `u32::MAX` or more: a shard holds fewer than 2³² − 1 events.
    pub(super) fn insert(&mut self, vacant: Vacant, slot: usize) {
        debug_assert_eq!(self.buckets[vacant.bucket], EMPTY, "the vacant bucket is still empty");
        self.buckets[vacant.bucket] = bucket_of(vacant.hash, slot);
        self.len += 1;
    }

    /// Removes `slot`'s entry, whose hash is `hash`; `false` when there was none.
    pub(super) fn remove(&mut self, hash: u32, slot: usize) -> bool {
        let Ok((mut hole, _)) = self.probe(hash, &mut |s| s == slot) else { return false };
        // Every entry after the hole, up to the next empty bucket, whose probe started at or
        // before the hole moves into it, leaving its own bucket as the next hole.
        let mask = self.mask();
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let bucket = self.buckets[at];
            if bucket == EMPTY {
                break;
            }
            let start = self.home(Self::hash_of(bucket));
            if at.wrapping_sub(start) & mask >= at.wrapping_sub(hole) & mask {
                self.buckets[hole] = bucket;
                hole = at;
            }
        }
        self.buckets[hole] = EMPTY;
        self.len -= 1;
        true
    }

    /// Points `slot`'s entry, whose hash is `hash`, at `to` instead; `false` when there was none.
    ///
    /// # Panics
    /// As [`IdIndex::insert`], when `to` is `u32::MAX` or more.
    pub(super) fn relocate(&mut self, hash: u32, slot: usize, to: usize) -> bool {
        let Ok((bucket, _)) = self.probe(hash, &mut |s| s == slot) else { return false };
        self.buckets[bucket] = bucket_of(hash, to);
        true
    }

    /// Entries held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Removes every entry, keeping the buckets.
    pub(super) fn clear(&mut self) {
        self.buckets.fill(EMPTY);
        self.len = 0;
    }

    /// `Ok((bucket, slot))` of the entry with `hash` for which `is` holds, else `Err` with the
    /// empty bucket that ended the probe (an index never fills, so one does).
    fn probe(&self, hash: u32, is: &mut impl FnMut(usize) -> bool) -> Result<(usize, usize), usize> {
        if self.buckets.is_empty() {
            return Err(0);
        }
        let mask = self.mask();
        let mut at = self.home(hash);
        loop {
            let bucket = self.buckets[at];
            if bucket == EMPTY {
                return Err(at);
            }
            if Self::hash_of(bucket) == hash {
                let slot = Self::slot_of(bucket);
                if is(slot) {
                    return Ok((at, slot));
                }
            }
            at = (at + 1) & mask;
        }
    }

    /// Twice the buckets, every entry placed again.
    #[cold]
    fn grow(&mut self) {
        let count = (self.buckets.len() * 2).max(MIN_BUCKETS);
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; count].into_boxed_slice());
        let mask = self.mask();
        for bucket in old.iter().copied().filter(|&b| b != EMPTY) {
            let mut at = self.home(Self::hash_of(bucket));
            while self.buckets[at] != EMPTY {
                at = (at + 1) & mask;
            }
            self.buckets[at] = bucket;
        }
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    fn home(&self, hash: u32) -> usize {
        hash as usize & self.mask()
    }

    fn hash_of(bucket: u64) -> u32 {
        #[allow(clippy::cast_possible_truncation, reason = "the high half")]
        let hash = (bucket >> 32) as u32;
        hash
    }

    fn slot_of(bucket: u64) -> usize {
        #[allow(clippy::cast_possible_truncation, reason = "the low half")]
        let slot = bucket as u32;
        slot as usize - 1
    }
}

/// The bucket of the entry of `slot` with `hash`.
///
/// # Panics
/// When `slot` is `u32::MAX` or more: a shard holds fewer than 2³² − 1 events.
fn bucket_of(hash: u32, slot: usize) -> u64 {
    let slot =
        u32::try_from(slot).ok().filter(|&s| s < u32::MAX).expect("fewer than 2^32 - 1 events in one shard");
    (u64::from(hash) << 32) | u64::from(slot + 1)
}

/// Where [`IdIndex::find_or_vacant`] found room for an entry.
#[derive(Clone, Copy)]
pub(super) struct Vacant {
    bucket: usize,
    hash: u32,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32),
        Remove(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        // Few distinct hashes, and ones that share their low bits, so collisions and long runs
        // (which removal must shift back across) are the rule.
        let hash = prop_oneof![0u32..8, any::<u32>().prop_map(|h| h & !0xff)];
        prop::collection::vec(
            prop_oneof![hash.prop_map(Op::Insert), any::<usize>().prop_map(Op::Remove)],
            0..400,
        )
    }

    proptest! {
        /// Every entry is found by its hash and slot after any mix of inserts and removals, none
        /// is found once removed, and the count stays right across growth.
        #[test]
        fn matches_a_map_of_slots(ops in ops()) {
            let mut index = IdIndex::new();
            let mut model: HashMap<usize, u32> = HashMap::new();
            let mut next_slot = 0;
            for op in ops {
                match op {
                    Op::Insert(hash) => {
                        let vacant = index.find_or_vacant(hash, |s| !model.contains_key(&s)).expect_err("a new slot");
                        index.insert(vacant, next_slot);
                        model.insert(next_slot, hash);
                        next_slot += 1;
                    }
                    Op::Remove(pick) => {
                        if model.is_empty() {
                            continue;
                        }
                        let mut slots: Vec<usize> = model.keys().copied().collect();
                        slots.sort_unstable();
                        let slot = slots[pick % slots.len()];
                        let hash = model.remove(&slot).unwrap();
                        prop_assert!(index.remove(hash, slot));
                        prop_assert!(!index.remove(hash, slot), "removed twice");
                    }
                }
                prop_assert_eq!(index.len, model.len());
                for (&slot, &hash) in &model {
                    prop_assert_eq!(index.find(hash, |s| s == slot), Some(slot));
                }
                prop_assert!(index.len * 4 <= index.buckets.len() * 3 || index.len == 0);
            }
        }
    }

    #[test]
    fn an_empty_index_finds_and_removes_nothing() {
        let mut index = IdIndex::new();
        index.prefetch(7);
        assert_eq!(index.find(7, |_| true), None);
        assert!(!index.remove(7, 0));
    }
}
