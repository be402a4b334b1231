//! [`MatchCache`]: a worker's bounded memory of `event type → matched values`.
//!
//! ## Layout
//! A set-associative table: the high half of the type's hash picks a set of [`WAYS`] (8) slots,
//! and only those are searched or replaced. A set's tags (the low half of the hash) and
//! last-use stamps fill one 64-byte line, so a probe and a replacement read and write one line,
//! then the matching slot's generation and key. Eight ways keep conflict misses rare: with as many
//! types in play as a quarter of the capacity, about one type in 7,000 finds its set full (one in
//! 230 with four ways); at half the capacity, one in 120. A slot owns its key and values buffers
//! and keeps them when it is refilled: once warm, a miss allocates nothing (as long as the new
//! type and its values fit the buffers they replace).
//!
//! ## Admission
//! A type that is not cached gets a slot on its second miss within a window, not its first: a
//! doorkeeper bitset (4 bits per slot, cleared after as many first misses as there are slots)
//! remembers the first. A first miss is answered from a scratch buffer. So types seen once (one-off
//! names, or far more types than fit) never push out types in use, and such a miss costs one hash,
//! one probe and one bit on top of the cold match. The price: a type is cached from its second
//! lookup on, a hit from its third.
//!
//! ## Replacement and invalidation
//! An admitted type fills the slot that holds the same type from an older generation, else an
//! empty slot, else the least recently used slot of its set: O(1) work, whatever the capacity.
//! Each slot remembers the [`PatternSet::generation`] it was filled under, and a slot from another
//! generation is a miss; a change of the set therefore costs nothing up front (no O(capacity)
//! sweep): each stale slot is refilled, without the doorkeeper, the next time its type comes by,
//! and stale slots nobody asks for age out first.
//!
//! ## Overflow
//! With far more types in play than fit, most lookups miss, and most misses are first misses: on
//! the `matching` bench, with 10× more distinct types than capacity, the cached path costs about
//! what the cold match costs (figures in the pattern module's docs). There is no sweep, no map
//! rehashing and no allocation that could make the cache a net loss, the fate of the random-evict
//! cache NATS measured at 100k subjects. A hit costs a hash, a probe and a compare: a few
//! nanoseconds.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

use foldhash::fast::FixedState;

use super::PatternSet;

/// Slots per set: a type can live in any of these, and they compete only with each other.
pub(crate) const WAYS: usize = 8;

/// The bookkeeping of one set, apart from the slots' buffers: one cache line, so a probe and a
/// replacement read and write one line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Set {
    /// Each way's tag: the low half of its type's hash, with the low bit set; 0 marks an empty
    /// way. A tag match is confirmed by comparing the type itself.
    tags: [u32; WAYS],
    /// The cache's clock (its low 32 bits) at each way's last use, for least-recently-used
    /// replacement. Compared as ages, `clock - last_used`, so the clock may wrap.
    last_used: [u32; WAYS],
}

/// The buffers of a slot, kept across refills.
#[derive(Debug)]
struct Slot<T> {
    /// The generation of the pattern set the slot was filled from.
    generation: u64,
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
/// for _ in 0..3 {
///     cache.get_or_match(&set, "a.b"); // noted, cached, then a hit
/// }
/// let stats = cache.stats();
/// assert_eq!((stats.hits, stats.misses, stats.evictions), (1, 2, 0));
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that ran the match against the set: a type not cached (its first miss only noted
    /// by the doorkeeper, a later one cached), or one cached under another generation.
    pub misses: u64,
    /// Misses that pushed out a slot still current for the set it was looked up with: a measure of
    /// the cache being too small for the types in play.
    pub evictions: u64,
}

/// A bounded cache of `event type → matched values`, in [`EntryId`](super::EntryId) order, for one
/// thread (it takes `&mut self`, and holds no lock).
///
/// Results are tied to the [`PatternSet::generation`] they were computed under, so the same cache
/// can serve a worker across every new version of the set it is handed. A type is cached from
/// its second lookup on, so that types seen once never push out types in use. See the
/// [pattern module](crate::pattern#guarantees) for costs.
///
/// ```
/// use eventbroker::{MatchCache, Pattern, PatternSet};
///
/// let mut set = PatternSet::new();
/// set.insert(&Pattern::parse("public.*.create")?, "welcome");
/// let mut cache = MatchCache::new(1024);
///
/// for _ in 0..3 {
///     assert_eq!(cache.get_or_match(&set, "public.users.create"), ["welcome"]);
/// }
/// assert_eq!(cache.stats().hits, 1);
///
/// set.insert(&Pattern::parse("*")?, "all");
/// assert_eq!(cache.get_or_match(&set, "public.users.create"), ["welcome", "all"]);
/// assert_eq!(cache.get_or_match(&set, "public.users.create"), ["welcome", "all"]);
/// assert_eq!(cache.stats().hits, 2);
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
pub struct MatchCache<T> {
    sets: Box<[Set]>,
    /// `WAYS` slots per set, set after set.
    slots: Box<[Slot<T>]>,
    /// Number of sets minus one; the number of sets is a power of two.
    set_mask: usize,
    /// The doorkeeper: one bit per hash of a type that missed recently and was not admitted.
    /// `DOORKEEPER_BITS` bits per slot; cleared after as many marks as there are slots.
    seen: Box<[u64]>,
    /// Marks set in `seen` since it was last cleared.
    seen_marks: usize,
    /// Where a type's first miss is answered from: it is not worth a slot yet.
    scratch: Vec<T>,
    /// Advances on every lookup, wrapping; stamps `Set::last_used`.
    clock: u32,
    stats: CacheStats,
    hasher: FixedState,
}

/// Doorkeeper bits per slot; a power of two. With at most one mark per slot before a clear, about
/// one type in five seen for the first time is let in early by a colliding bit: harmless.
const DOORKEEPER_BITS: usize = 4;

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
            slots: (0..slots)
                .map(|_| Slot { generation: 0, event_type: String::new(), values: Vec::new() })
                .collect(),
            set_mask: sets - 1,
            // At least 8 slots of 4 bits: a power of two of at least 32 bits, so one word or more.
            seen: vec![0; (slots * DOORKEEPER_BITS).div_ceil(64)].into_boxed_slice(),
            seen_marks: 0,
            scratch: Vec::new(),
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
    /// cache.get_or_match(&set, "a"); // cached from its second lookup
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
    /// cache.get_or_match(&set, "a"); // cached from its second lookup
    /// cache.clear();
    /// cache.get_or_match(&set, "a");
    /// assert_eq!((cache.stats().hits, cache.stats().misses), (0, 3));
    /// ```
    pub fn clear(&mut self) {
        self.sets.fill(Set::default());
        self.seen.fill(0);
        self.seen_marks = 0;
        self.scratch.clear();
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
    /// matched and cloned into a buffer of the cache: a slot, from the type's second miss on, and
    /// a scratch buffer on its first.
    ///
    /// ```
    /// use eventbroker::{MatchCache, Pattern, PatternSet};
    ///
    /// let set: PatternSet<u32> =
    ///     [(Pattern::parse("a.>")?, 1), (Pattern::parse("*")?, 2)].into_iter().collect();
    /// let mut cache = MatchCache::new(256);
    /// assert_eq!(cache.get_or_match(&set, "a.b"), [1, 2]); // noted
    /// assert_eq!(cache.get_or_match(&set, "b"), [2]); // noted
    /// assert_eq!(cache.get_or_match(&set, "a.b"), [1, 2]); // cached
    /// assert_eq!(cache.get_or_match(&set, "a.b"), [1, 2]); // a hit
    /// assert_eq!((cache.stats().hits, cache.stats().misses), (1, 3));
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn get_or_match(&mut self, set: &PatternSet<T>, event_type: &str) -> &[T] {
        // The bytes alone: `str`'s `Hash` adds a terminator round that a single key does not need.
        let mut hasher = self.hasher.build_hasher();
        hasher.write(event_type.as_bytes());
        let hash = hasher.finish();
        // The set comes from the high half of the hash, the tag from the low half.
        let index = usize::try_from(hash >> 32).unwrap_or(usize::MAX) & self.set_mask;
        #[expect(clippy::cast_possible_truncation, reason = "the tag is the low half of the hash")]
        let tag = hash as u32 | 1;
        let first = index * WAYS;
        let generation = set.generation();
        self.clock = self.clock.wrapping_add(1);

        let same_type = (0..WAYS).find(|&way| {
            self.sets[index].tags[way] == tag && self.slots[first + way].event_type == event_type
        });
        if let Some(way) = same_type
            && self.slots[first + way].generation == generation
        {
            self.stats.hits += 1;
            self.sets[index].last_used[way] = self.clock;
            return &self.slots[first + way].values;
        }

        self.stats.misses += 1;
        if same_type.is_none() && !self.admit(hash) {
            self.scratch.clear();
            set.clone_matches_into(event_type, &mut self.scratch);
            return &self.scratch;
        }
        let clock = self.clock;
        let lines = &mut self.sets[index];
        // Stale slots are not sought out: nothing hits them any more, so they are the first to
        // become least recently used.
        let way = same_type.unwrap_or_else(|| {
            (0..WAYS).find(|&way| lines.tags[way] == 0).unwrap_or_else(|| {
                self.stats.evictions += 1;
                (0..WAYS).max_by_key(|&way| clock.wrapping_sub(lines.last_used[way])).unwrap_or(0)
            })
        });
        lines.tags[way] = tag;
        lines.last_used[way] = clock;
        let slot = &mut self.slots[first + way];
        slot.generation = generation;
        slot.event_type.clear();
        slot.event_type.push_str(event_type);
        slot.values.clear();
        set.clone_matches_into(event_type, &mut slot.values);
        &slot.values
    }
}

impl<T> MatchCache<T> {
    /// The admission rule: a type not in the cache gets a slot on its second miss within the
    /// doorkeeper's window, so types seen once (one-off names, a scan through more types than
    /// fit) never push out types in use, and their misses cost little more than a cold match.
    /// Clearing the window costs one word per 16 slots, once per as many first misses as slots.
    fn admit(&mut self, hash: u64) -> bool {
        // Low bits of the hash (the high ones pick the set); `seen` holds a power of two of
        // bits, so a mask picks one.
        let bit = usize::try_from(hash >> 1).unwrap_or(usize::MAX) & (self.seen.len() * 64 - 1);
        let (word, mask) = (bit / 64, 1u64 << (bit % 64));
        if self.seen[word] & mask != 0 {
            return true;
        }
        if self.seen_marks == self.slots.len() {
            self.seen.fill(0);
            self.seen_marks = 0;
        }
        self.seen[word] |= mask;
        self.seen_marks += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pattern;

    fn set_of(patterns: &[&str]) -> PatternSet<usize> {
        patterns.iter().enumerate().map(|(i, p)| (Pattern::parse(p).unwrap(), i)).collect()
    }

    /// Looks `event_type` up twice, so that it is cached.
    fn warm(cache: &mut MatchCache<usize>, set: &PatternSet<usize>, event_type: &str) {
        cache.get_or_match(set, event_type);
        cache.get_or_match(set, event_type);
    }

    #[test]
    fn a_type_is_cached_on_its_second_miss() {
        let set = set_of(&["a.*", "*", "a.b"]);
        let mut cache = MatchCache::new(8);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 1, 2]);
        assert_eq!(cache.get_or_match(&set, "c"), [1]);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 1, 2]);
        assert_eq!(cache.stats(), CacheStats { hits: 0, misses: 3, evictions: 0 });
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 1, 2]);
        assert_eq!(cache.get_or_match(&set, "c"), [1]);
        assert_eq!(cache.get_or_match(&set, "c"), [1]);
        assert_eq!(cache.stats(), CacheStats { hits: 2, misses: 4, evictions: 0 });
    }

    #[test]
    fn the_doorkeeper_forgets_after_a_window() {
        let set = set_of(&["*"]);
        let mut cache = MatchCache::new(8);
        cache.get_or_match(&set, "x");
        // As many other first misses as there are slots clear the doorkeeper, so "x" starts over.
        for i in 0..cache.capacity() {
            cache.get_or_match(&set, &format!("other{i}"));
        }
        cache.get_or_match(&set, "x");
        cache.get_or_match(&set, "x");
        cache.get_or_match(&set, "x");
        assert_eq!(cache.stats().hits, 1);
    }

    #[test]
    fn a_new_generation_invalidates_and_refills_at_once() {
        let mut set = set_of(&["a.*"]);
        let mut cache = MatchCache::new(8);
        warm(&mut cache, &set, "a.b");
        let id = set.insert(&Pattern::parse("a.b").unwrap(), 7);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 7]);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0, 7]);
        set.remove(&Pattern::parse("a.b").unwrap(), id);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0]);
        assert_eq!(cache.get_or_match(&set, "a.b"), [0]);
        // Stale slots are refilled in place, with no second trip through the doorkeeper.
        assert_eq!(cache.stats(), CacheStats { hits: 2, misses: 4, evictions: 0 });
    }

    #[test]
    fn two_sets_never_share_results() {
        // Same contents, built separately: different generations, so no confusion either way.
        let a = set_of(&["x"]);
        let b = set_of(&["y"]);
        let mut cache = MatchCache::new(8);
        warm(&mut cache, &a, "x");
        assert!(cache.get_or_match(&b, "x").is_empty()); // refilled for `b`
        assert!(cache.get_or_match(&b, "x").is_empty()); // a hit
        assert_eq!(cache.get_or_match(&a, "x"), [0]); // refilled for `a`
        assert_eq!(cache.stats().hits, 1);
    }

    #[test]
    fn a_clone_shares_its_originals_results_until_it_changes() {
        let set = set_of(&["x"]);
        let mut cache = MatchCache::new(8);
        warm(&mut cache, &set, "x");
        let mut clone = set.clone();
        assert_eq!(cache.get_or_match(&clone, "x"), [0]);
        assert_eq!(cache.stats().hits, 1);
        clone.insert(&Pattern::parse("x").unwrap(), 1);
        assert_eq!(cache.get_or_match(&clone, "x"), [0, 1]);
        assert_eq!(cache.stats().hits, 1);
    }

    #[test]
    fn stays_correct_when_types_overflow_it() {
        let set = set_of(&["t.*", "*.3", "t.1.>"]);
        let mut cache = MatchCache::new(4);
        for round in 0..4 {
            for i in 0..100 {
                let t = format!("t.{i}");
                let expected: Vec<usize> = set.matches(&t).values().copied().collect();
                for _ in 0..3 {
                    assert_eq!(cache.get_or_match(&set, &t), expected, "round {round}, {t}");
                }
            }
        }
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, 1200);
        assert!(stats.hits >= 400, "each type hits by its third lookup in a row: {stats:?}");
        assert!(stats.evictions > 250, "{stats:?}");
    }

    #[test]
    fn the_least_recently_used_way_goes() {
        // One set of eight ways: all types compete for it.
        let set = set_of(&["*"]);
        let mut cache = MatchCache::new(1);
        assert_eq!(cache.capacity(), WAYS);
        let types = ["a", "b", "c", "d", "e", "f", "g", "h"];
        for t in types {
            warm(&mut cache, &set, t);
        }
        cache.get_or_match(&set, "a"); // now "b" is the oldest
        warm(&mut cache, &set, "i");
        cache.reset_stats();
        for t in types.iter().chain(&["i"]).filter(|&&t| t != "b") {
            cache.get_or_match(&set, t);
        }
        assert_eq!(cache.stats().hits, 8);
        cache.get_or_match(&set, "b");
        assert_eq!(cache.stats().misses, 1);
    }

    #[test]
    fn lru_survives_the_clock_wrapping() {
        let set = set_of(&["*"]);
        let mut cache = MatchCache::new(1);
        cache.clock = u32::MAX - 3;
        let types = ["a", "b", "c", "d", "e", "f", "g", "h"];
        for t in types {
            warm(&mut cache, &set, t);
        }
        cache.get_or_match(&set, "a"); // stamped after the wrap; "b" is the oldest
        warm(&mut cache, &set, "i");
        cache.reset_stats();
        cache.get_or_match(&set, "a");
        cache.get_or_match(&set, "b");
        assert_eq!((cache.stats().hits, cache.stats().misses), (1, 1));
    }

    #[test]
    fn clear_forgets() {
        let set = set_of(&["*"]);
        let mut cache = MatchCache::new(8);
        warm(&mut cache, &set, "a");
        cache.clear();
        assert_eq!(cache.get_or_match(&set, "a"), [0]);
        assert_eq!(cache.get_or_match(&set, "a"), [0]);
        assert_eq!((cache.stats().hits, cache.stats().misses), (0, 4));
    }
}
