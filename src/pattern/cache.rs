//! [`MatchCache`]: a worker's bounded memory of `event type → matched values`.
//!
//! ## Layout
//! A set-associative table: the type's hash picks a set of [`WAYS`] (8) slots, and only those
//! are searched or replaced. The eight hashes of a set fill one 64-byte cache line, so a probe
//! reads that line, then the generation and clock of the one slot whose hash matches, then its
//! key. Eight ways keep conflict misses rare: with as many types in play as a quarter of the
//! capacity, about one type in 7,000 finds its set full (one in 230 with four ways); at half the
//! capacity, one in 120. A slot owns its key and
//! values buffers and keeps them when it is refilled: once warm, a miss allocates nothing (as
//! long as the new type and its values fit the buffers they replace).
//!
//! ## Replacement and invalidation
//! A miss fills, in this order of preference, the slot that holds the same type from an older
//! generation, an empty slot, a slot filled under another generation, and otherwise the least
//! recently used slot of the set: O(1) work per miss, whatever the capacity. Each slot remembers
//! the [`PatternSet::generation`] it was filled under, and a slot from another generation is a
//! miss; a change of the set therefore costs nothing up front (no O(capacity) sweep), each stale
//! slot is refilled the next time its type comes by.
//!
//! ## Overflow
//! When far more types are in play than fit, most lookups miss. A miss then costs the cold match
//! plus one hash, one probe and copying the type and the values into a reused slot: on the
//! `matching` bench, with 10× more distinct types than capacity, the cached path costs about
//! the same as the cold match (figures in the pattern module's docs). There is no sweep,
//! no map rehashing and no allocation that could make the cache a net loss, the fate of the
//! random-evict cache NATS measured at 100k subjects. A hit costs a hash and a compare: tens of
//! nanoseconds.

use std::fmt;
use std::hash::BuildHasher;

use foldhash::fast::FixedState;

use super::PatternSet;

/// Slots per set: a type can live in any of these, and they compete only with each other.
pub(crate) const WAYS: usize = 8;

/// The bookkeeping of one set, apart from the slots' buffers so a probe touches little memory.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Set {
    /// Each way's type hash with the low bit set; 0 marks an empty way. One cache line.
    hashes: [u64; WAYS],
    /// The generation of the pattern set each way was filled from.
    generations: [u64; WAYS],
    /// The cache's clock at each way's last use, for least-recently-used replacement.
    last_used: [u64; WAYS],
}

/// The buffers of a slot, kept across refills.
#[derive(Debug)]
struct Slot<T> {
    event_type: String,
    values: Vec<T>,
}

/// How a [`MatchCache`] has been doing.
///
/// ```
/// use eventbroker::{MatchCache, Pattern, PatternSet};
///
/// let set: PatternSet<u8> = [(Pattern::parse("a.*")?, 1)].into_iter().collect();
/// let mut cache = MatchCache::new(64);
/// cache.get_or_match(&set, "a.b");
/// cache.get_or_match(&set, "a.b");
/// let stats = cache.stats();
/// assert_eq!((stats.hits, stats.misses, stats.evictions), (1, 1, 0));
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that ran the match against the set (new type, or one cached under another
    /// generation).
    pub misses: u64,
    /// Misses that pushed out a slot still current for the set it was looked up with: a measure of
    /// the cache being too small for the types in play.
    pub evictions: u64,
}

/// A bounded cache of `event type → matched values`, in [`EntryId`](super::EntryId) order, for one
/// thread (it takes `&mut self`, and holds no lock).
///
/// Results are tied to the [`PatternSet::generation`] they were computed under, so the same cache
/// can serve a worker across every new version of the set it is handed. See the
/// [pattern module](crate::pattern#guarantees) for costs.
///
/// ```
/// use eventbroker::{MatchCache, Pattern, PatternSet};
///
/// let mut set = PatternSet::new();
/// set.insert(&Pattern::parse("public.*.create")?, "welcome");
/// let mut cache = MatchCache::new(1024);
///
/// assert_eq!(cache.get_or_match(&set, "public.users.create"), ["welcome"]);
/// assert_eq!(cache.get_or_match(&set, "public.users.create"), ["welcome"]); // a hit
///
/// set.insert(&Pattern::parse("*")?, "all");
/// assert_eq!(cache.get_or_match(&set, "public.users.create"), ["welcome", "all"]);
/// assert_eq!(cache.stats().hits, 1);
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
pub struct MatchCache<T> {
    sets: Box<[Set]>,
    /// `WAYS` slots per set, set after set.
    slots: Box<[Slot<T>]>,
    /// Number of sets minus one; the number of sets is a power of two.
    set_mask: usize,
    /// Advances on every lookup; stamps `Set::last_used`.
    clock: u64,
    stats: CacheStats,
    hasher: FixedState,
}

impl<T> MatchCache<T> {
    /// A cache of at least `capacity` types: the capacity is rounded up to a power of two of at
    /// least 8 slots. Slots start empty and get their buffers on first use.
    ///
    /// ```
    /// use eventbroker::MatchCache;
    ///
    /// assert_eq!(MatchCache::<u32>::new(1000).capacity(), 1024);
    /// assert_eq!(MatchCache::<u32>::new(0).capacity(), 8);
    /// ```
    pub fn new(capacity: usize) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        let slots = sets * WAYS;
        Self {
            sets: vec![Set::default(); sets].into_boxed_slice(),
            slots: (0..slots).map(|_| Slot { event_type: String::new(), values: Vec::new() }).collect(),
            set_mask: sets - 1,
            clock: 0,
            stats: CacheStats::default(),
            hasher: FixedState::default(),
        }
    }

    /// How many types the cache holds at most.
    ///
    /// ```
    /// use eventbroker::MatchCache;
    ///
    /// assert_eq!(MatchCache::<()>::new(4096).capacity(), 4096);
    /// ```
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Hits, misses and evictions since the cache was made or [`reset_stats`](Self::reset_stats).
    ///
    /// ```
    /// use eventbroker::{MatchCache, PatternSet};
    ///
    /// let set = PatternSet::<()>::new();
    /// let mut cache = MatchCache::new(16);
    /// assert!(cache.get_or_match(&set, "a").is_empty());
    /// assert_eq!(cache.stats().misses, 1);
    /// ```
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Zeroes the counters of [`stats`](Self::stats); the cached results stay.
    ///
    /// ```
    /// use eventbroker::{MatchCache, PatternSet};
    ///
    /// let set = PatternSet::<()>::new();
    /// let mut cache = MatchCache::new(16);
    /// cache.get_or_match(&set, "a");
    /// cache.reset_stats();
    /// cache.get_or_match(&set, "a");
    /// assert_eq!((cache.stats().hits, cache.stats().misses), (1, 0));
    /// ```
    pub fn reset_stats(&mut self) {
        self.stats = CacheStats::default();
    }

    /// Forgets every cached result, keeping the slots' buffers. Never needed for correctness (a
    /// changed set is detected by its generation); useful to drop references to values early.
    ///
    /// ```
    /// use eventbroker::{MatchCache, PatternSet};
    ///
    /// let set = PatternSet::<()>::new();
    /// let mut cache = MatchCache::new(16);
    /// cache.get_or_match(&set, "a");
    /// cache.clear();
    /// cache.get_or_match(&set, "a");
    /// assert_eq!(cache.stats().misses, 2);
    /// ```
    pub fn clear(&mut self) {
        self.sets.fill(Set::default());
        for slot in &mut self.slots {
            slot.values.clear();
        }
    }
}

impl<T> fmt::Debug for MatchCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatchCache")
            .field("capacity", &self.capacity())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<T: Clone> MatchCache<T> {
    /// The values of `set` whose pattern matches `event_type`, in id order: from the cache when
    /// it holds this type for this [generation](PatternSet::generation) of `set`, otherwise
    /// matched, cloned into a slot, and returned from there.
    ///
    /// ```
    /// use eventbroker::{MatchCache, Pattern, PatternSet};
    ///
    /// let set: PatternSet<u32> =
    ///     [(Pattern::parse("a.>")?, 1), (Pattern::parse("*")?, 2)].into_iter().collect();
    /// let mut cache = MatchCache::new(256);
    /// assert_eq!(cache.get_or_match(&set, "a.b"), [1, 2]);
    /// assert_eq!(cache.get_or_match(&set, "b"), [2]);
    /// assert_eq!(cache.get_or_match(&set, "a.b"), [1, 2]);
    /// assert_eq!(cache.stats().hits, 1);
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn get_or_match(&mut self, set: &PatternSet<T>, event_type: &str) -> &[T] {
        let hash = self.hasher.hash_one(event_type) | 1;
        // The set comes from the high bits; the whole hash is compared within it.
        let index = usize::try_from(hash >> 32).unwrap_or(usize::MAX) & self.set_mask;
        let generation = set.generation();
        self.clock += 1;

        let tags = &mut self.sets[index];
        let slots = &mut self.slots[index * WAYS..][..WAYS];
        let same_type =
            (0..WAYS).find(|&way| tags.hashes[way] == hash && slots[way].event_type == event_type);
        if let Some(way) = same_type
            && tags.generations[way] == generation
        {
            self.stats.hits += 1;
            tags.last_used[way] = self.clock;
            return &slots[way].values;
        }

        self.stats.misses += 1;
        let way = same_type.unwrap_or_else(|| {
            (0..WAYS)
                .find(|&way| tags.hashes[way] == 0 || tags.generations[way] != generation)
                .unwrap_or_else(|| {
                    self.stats.evictions += 1;
                    (0..WAYS).min_by_key(|&way| tags.last_used[way]).unwrap_or(0)
                })
        });
        tags.hashes[way] = hash;
        tags.generations[way] = generation;
        tags.last_used[way] = self.clock;
        let slot = &mut slots[way];
        slot.event_type.clear();
        slot.event_type.push_str(event_type);
        slot.values.clear();
        slot.values.extend(set.matches(event_type).values().cloned());
        &slot.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pattern;

    fn set_of(patterns: &[&str]) -> PatternSet<usize> {
        patterns.iter().enumerate().map(|(i, p)| (Pattern::parse(p).unwrap(), i)).collect()
    }

    #[test]
    fn hits_after_a_miss() {
        let set = set_of(&["a.*", "*", "a.b"]);
        let mut cache = MatchCache::new(8);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 1, 2]);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 1, 2]);
        assert_eq!(cache.get_or_match(&set, "c"), [1]);
        assert_eq!(cache.stats(), CacheStats { hits: 1, misses: 2, evictions: 0 });
    }

    #[test]
    fn a_new_generation_invalidates() {
        let mut set = set_of(&["a.*"]);
        let mut cache = MatchCache::new(8);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0]);
        let id = set.insert(&Pattern::parse("a.b").unwrap(), 7);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 7]);
        set.remove(&Pattern::parse("a.b").unwrap(), id);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0]);
        assert_eq!(cache.stats().misses, 3);
        assert_eq!(cache.stats().evictions, 0, "stale slots are refilled, not evicted");
    }

    #[test]
    fn two_sets_never_share_results() {
        // Same contents, built separately: different generations, so no confusion either way.
        let a = set_of(&["x"]);
        let b = set_of(&["y"]);
        let mut cache = MatchCache::new(8);
        assert_eq!(cache.get_or_match(&a, "x"), [0]);
        assert!(cache.get_or_match(&b, "x").is_empty());
        assert_eq!(cache.get_or_match(&a, "x"), [0]);
    }

    #[test]
    fn a_clone_shares_its_originals_results_until_it_changes() {
        let set = set_of(&["x"]);
        let mut cache = MatchCache::new(8);
        cache.get_or_match(&set, "x");
        let clone = set.clone();
        assert_eq!(cache.get_or_match(&clone, "x"), [0]);
        assert_eq!(cache.stats().hits, 1);
    }

    #[test]
    fn stays_correct_when_types_overflow_it() {
        let set = set_of(&["t.*", "*.3", "t.1.>"]);
        let mut cache = MatchCache::new(4);
        for round in 0..3 {
            for i in 0..100 {
                let t = format!("t.{i}");
                let expected: Vec<usize> = set.matches(&t).values().copied().collect();
                assert_eq!(cache.get_or_match(&set, &t), expected, "round {round}, {t}");
            }
        }
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, 300);
        assert!(stats.evictions > 250);
    }

    #[test]
    fn the_least_recently_used_way_goes() {
        // One set of eight ways: all types compete for it.
        let set = set_of(&["*"]);
        let mut cache = MatchCache::new(1);
        assert_eq!(cache.capacity(), WAYS);
        let types = ["a", "b", "c", "d", "e", "f", "g", "h"];
        for t in types {
            cache.get_or_match(&set, t);
        }
        cache.get_or_match(&set, "a"); // now "b" is the oldest
        cache.get_or_match(&set, "i");
        cache.reset_stats();
        for t in types.iter().chain(&["i"]).filter(|&&t| t != "b") {
            cache.get_or_match(&set, t);
        }
        assert_eq!(cache.stats().hits, 8);
        cache.get_or_match(&set, "b");
        assert_eq!(cache.stats().misses, 1);
    }

    #[test]
    fn clear_forgets() {
        let set = set_of(&["*"]);
        let mut cache = MatchCache::new(8);
        cache.get_or_match(&set, "a");
        cache.clear();
        assert_eq!(cache.get_or_match(&set, "a"), [0]);
        assert_eq!(cache.stats().misses, 2);
    }
}
