//! [`PatternSet`]: many patterns compiled into one persistent segment trie.
//!
//! Each trie node has literal edges (a short inline list, a hash map past
//! [`INLINE_LITERALS`] (8) children, [`SHARDS`] (64) maps behind their own `Arc`s past
//! [`SHARDED_LITERALS`] (1024)), at most one `*` edge, the entries whose pattern ends in `>`
//! right below it, and the entries whose pattern ends at it. Patterns that are exactly `*` live
//! in a list of their own and match every type.
//!
//! The guarantees, with measured numbers, are in [the pattern module's docs](super): a match
//! visits at most two children per node (the literal named by the next segment, and `*`), never
//! anything proportional to the number of entries; a change copies only its path, wide nodes
//! copying one shard of their children.
//!
//! Nodes sit behind [`Arc`]s and change through [`Arc::make_mut`], so a node shared with another
//! version is copied on the way down and an unshared one is changed in place: the one code path
//! serves bulk builds and snapshot updates alike.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::ops::{ControlFlow, Deref};
// The trie is data, not a synchronisation mechanism: nodes are immutable once shared, and the
// swap that publishes a set belongs to the broker. So it uses std's `Arc` (for `make_mut`, which
// loom's `Arc` lacks) rather than the `crate::sync` shim.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use foldhash::fast::FixedState;
use smallvec::SmallVec;

use super::{MAX_SEGMENTS, Pattern, Segment};

/// Literal children kept in a plain list, searched linearly, before the node switches to a hash
/// map. Most nodes of a `schema.entity.op` trie have a handful of children, and comparing a few
/// short strings beats hashing one.
pub(crate) const INLINE_LITERALS: usize = 8;

/// Literal children past which a node splits its map into [`SHARDS`] maps, each behind its own
/// `Arc`. Copying a node for a change (path copying) clones every `Arc` it holds, about 20 ns per
/// child counting the drop of the old copy later; a sharded node costs `SHARDS` of those plus the
/// one shard that changes. At 1024 children a plain map copies in ~20 µs.
pub(crate) const SHARDED_LITERALS: usize = 1024;

/// Shards of a node with more than [`SHARDED_LITERALS`] literal children; a power of two.
pub(crate) const SHARDS: usize = 64;

/// Results of one match kept inline, without a heap allocation.
const INLINE_MATCHES: usize = 8;

/// Source of [`PatternSet::generation`]. A std atomic, not the `crate::sync` shim: it is a plain
/// id dispenser (a `static`, which loom's atomics cannot be) and orders no other memory.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    // Relaxed: only uniqueness matters, and every `fetch_add` returns a distinct value whatever
    // the ordering. The set carrying the number is published by whoever shares it.
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// Identifies one entry of a [`PatternSet`]. Ids increase strictly in insertion order within a
/// set and the sets cloned from it, and matches come back sorted by id, so for a broker they are
/// subscription order.
///
/// ```
/// use eventbroker::{Pattern, PatternSet};
///
/// let mut set = PatternSet::new();
/// let first = set.insert(&Pattern::parse("a.*")?, "first");
/// let second = set.insert(&Pattern::parse("a.b")?, "second");
/// assert!(first < second);
/// assert_eq!(set.matches("a.b").ids().collect::<Vec<_>>(), [first, second]);
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(u64);

impl EntryId {
    /// The id as a number.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let mut set = PatternSet::new();
    /// assert_eq!(set.insert(&Pattern::parse("a")?, ()).get(), 0);
    /// assert_eq!(set.insert(&Pattern::parse("a")?, ()).get(), 1);
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "entry-{}", self.0)
    }
}

#[derive(Clone)]
struct Entry<T> {
    id: EntryId,
    value: T,
}

/// Entries kept sorted by id: ids only grow, so `push` keeps the order.
type Entries<T> = Vec<Entry<T>>;

fn position(entries: &[Entry<impl Sized>], id: EntryId) -> Option<usize> {
    entries.binary_search_by_key(&id, |e| e.id).ok()
}

type LiteralMap<T> = HashMap<Arc<str>, Arc<Node<T>>, FixedState>;

/// Picks a node's shard for a segment. Seeded apart from the maps' own hasher, so the keys of one
/// shard still spread over its map.
static SHARD_HASHER: FixedState = FixedState::with_seed(0x9E37_79B9_7F4A_7C15);

fn shard_of(segment: &str) -> usize {
    let bits = SHARDS.trailing_zeros();
    usize::try_from(SHARD_HASHER.hash_one(segment) >> (64 - bits)).unwrap_or(0)
}

/// A node's literal edges: a short list, a map once there are many, and maps behind their own
/// `Arc`s once there are very many, so that copying the node stays cheap.
#[derive(Clone)]
enum Literals<T> {
    Inline(Vec<(Arc<str>, Arc<Node<T>>)>),
    Map(LiteralMap<T>),
    /// `SHARDS` maps; a segment lives in `shards[shard_of(segment)]`.
    Sharded(Box<[Arc<LiteralMap<T>>]>),
}

impl<T> Literals<T> {
    fn get(&self, segment: &str) -> Option<&Arc<Node<T>>> {
        match self {
            Self::Inline(list) => list.iter().find(|(key, _)| **key == *segment).map(|(_, node)| node),
            Self::Map(map) => map.get(segment),
            Self::Sharded(shards) => shards[shard_of(segment)].get(segment),
        }
    }

    /// The edge to `segment`, for a change below it: copies its shard if shared.
    fn get_mut(&mut self, segment: &str) -> Option<&mut Arc<Node<T>>> {
        match self {
            Self::Inline(list) => list.iter_mut().find(|(key, _)| **key == *segment).map(|(_, node)| node),
            Self::Map(map) => map.get_mut(segment),
            Self::Sharded(shards) => Arc::make_mut(&mut shards[shard_of(segment)]).get_mut(segment),
        }
    }

    fn get_or_insert(&mut self, segment: &str) -> &mut Arc<Node<T>> {
        match self {
            Self::Inline(list)
                if list.len() >= INLINE_LITERALS && !list.iter().any(|(key, _)| **key == *segment) =>
            {
                *self = Self::Map(std::mem::take(list).into_iter().collect());
            }
            Self::Map(map) if map.len() >= SHARDED_LITERALS && !map.contains_key(segment) => {
                let mut shards: Vec<LiteralMap<T>> = (0..SHARDS).map(|_| LiteralMap::default()).collect();
                for (key, node) in map.drain() {
                    shards[shard_of(&key)].insert(key, node);
                }
                *self = Self::Sharded(shards.into_iter().map(Arc::new).collect());
            }
            _ => {}
        }
        let map = match self {
            Self::Inline(list) => {
                let i = list.iter().position(|(key, _)| **key == *segment).unwrap_or_else(|| {
                    list.push((segment.into(), Arc::default()));
                    list.len() - 1
                });
                return &mut list[i].1;
            }
            Self::Map(map) => map,
            Self::Sharded(shards) => Arc::make_mut(&mut shards[shard_of(segment)]),
        };
        // Look up first: `entry` would allocate the key even when it is there.
        if !map.contains_key(segment) {
            map.insert(segment.into(), Arc::default());
        }
        map.get_mut(segment).expect("inserted above")
    }

    fn remove(&mut self, segment: &str) {
        match self {
            Self::Inline(list) => list.retain(|(key, _)| **key != *segment),
            Self::Map(map) => {
                map.remove(segment);
            }
            Self::Sharded(shards) => {
                Arc::make_mut(&mut shards[shard_of(segment)]).remove(segment);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Inline(list) => list.is_empty(),
            Self::Map(map) => map.is_empty(),
            Self::Sharded(shards) => shards.iter().all(|shard| shard.is_empty()),
        }
    }
}

#[derive(Clone)]
struct Node<T> {
    literals: Literals<T>,
    star: Option<Arc<Node<T>>>,
    /// Entries whose pattern ends in `>` just below this node: one or more further segments.
    tail: Entries<T>,
    /// Entries whose pattern ends here.
    terminal: Entries<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self { literals: Literals::Inline(Vec::new()), star: None, tail: Vec::new(), terminal: Vec::new() }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.literals.is_empty() && self.star.is_none() && self.tail.is_empty() && self.terminal.is_empty()
    }
}

/// Where in the trie a pattern's entries live: the node path, and whether they hang off the last
/// node's `>` list or its terminal list.
fn split_tail(pattern: &Pattern) -> (&[Segment], bool) {
    match pattern.segments().split_last() {
        Some((Segment::Tail, path)) => (path, true),
        _ => (pattern.segments(), false),
    }
}

/// A compiled set of `(Pattern, value)` entries: which values does an event type match?
///
/// Matching costs the type's segments times the wildcard branches taken, never the number of
/// entries (see [the pattern module](crate::pattern#guarantees) for guarantees and numbers).
/// Results come back in [`EntryId`] order, which is insertion order; an entry matches at most
/// once, and two entries with the same pattern are two results.
///
/// A set is a persistent value: [`Clone`] is O(1), and changing a clone copies only the path
/// that changes, so the original snapshot is untouched and readers holding it never lock.
///
/// ```
/// use eventbroker::{Pattern, PatternSet};
///
/// let mut set = PatternSet::new();
/// set.insert(&Pattern::parse("public.users.create")?, "audit");
/// set.insert(&Pattern::parse("public.*.create")?, "welcome");
/// set.insert(&Pattern::parse("public.>")?, "mirror");
///
/// let hits: Vec<&str> = set.matches("public.users.create").values().copied().collect();
/// assert_eq!(hits, ["audit", "welcome", "mirror"]);
/// assert!(set.matches("admin.users.create").is_empty());
///
/// let snapshot = set.clone();
/// set.insert(&Pattern::parse("*")?, "everything");
/// assert_eq!(set.matches("admin.users.create").len(), 1);
/// assert_eq!(snapshot.matches("admin.users.create").len(), 0);
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
pub struct PatternSet<T> {
    root: Arc<Node<T>>,
    /// Entries whose pattern is exactly `*`.
    match_all: Arc<Entries<T>>,
    len: usize,
    next_id: u64,
    generation: u64,
}

impl<T> PatternSet<T> {
    /// An empty set, with a fresh [generation](Self::generation).
    ///
    /// ```
    /// use eventbroker::PatternSet;
    ///
    /// let set = PatternSet::<u32>::new();
    /// assert!(set.is_empty());
    /// assert!(set.matches("a.b").is_empty());
    /// ```
    pub fn new() -> Self {
        Self {
            root: Arc::default(),
            match_all: Arc::default(),
            len: 0,
            next_id: 0,
            generation: next_generation(),
        }
    }

    /// Number of entries.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let p = Pattern::parse("a.>")?;
    /// let set: PatternSet<_> = [(p.clone(), 1), (p, 2)].into_iter().collect();
    /// assert_eq!(set.len(), 2);
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set has no entries.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let mut set = PatternSet::new();
    /// assert!(set.is_empty());
    /// set.insert(&Pattern::parse("*")?, ());
    /// assert!(!set.is_empty());
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A number that identifies this version of the set among every set of the process: it is
    /// drawn from one process-wide counter by [`new`](Self::new) and by every `insert` or
    /// successful `remove`. A clone keeps its original's number until either changes. A
    /// [`MatchCache`](super::MatchCache) compares it to know its contents are current.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let mut set = PatternSet::new();
    /// let before = set.generation();
    /// let snapshot = set.clone();
    /// assert_eq!(snapshot.generation(), before);
    ///
    /// set.insert(&Pattern::parse("a")?, ());
    /// assert_ne!(set.generation(), before);
    /// assert_ne!(PatternSet::<()>::new().generation(), set.generation());
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The values whose pattern matches `event_type`, with their ids, in [`EntryId`] order.
    ///
    /// Allocates nothing for up to [`Matches::INLINE`] results and a type of up to
    /// [`MAX_SEGMENTS`](super::MAX_SEGMENTS) segments. `event_type` is not validated; like
    /// [`Pattern::matches`], an invalid type matches what its text matches.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let mut set = PatternSet::new();
    /// let all = set.insert(&Pattern::parse("*")?, "all");
    /// let deletes = set.insert(&Pattern::parse("*.*.delete")?, "deletes");
    /// set.insert(&Pattern::parse("*.*.create")?, "creates");
    ///
    /// let hits = set.matches("public.posts.delete");
    /// assert_eq!(hits.len(), 2);
    /// assert_eq!(hits[0], (all, &"all"));
    /// assert_eq!(hits[1], (deletes, &"deletes"));
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn matches(&self, event_type: &str) -> Matches<'_, T> {
        let mut matches = Matches { hits: SmallVec::new() };
        self.collect(event_type, &mut matches.hits);
        matches
    }

    /// Appends clones of the matched values to `out`, in id order: [`matches`](Self::matches)
    /// without handing the (id, reference) pairs back through a return value.
    pub(crate) fn clone_matches_into(&self, event_type: &str, out: &mut Vec<T>)
    where
        T: Clone,
    {
        let mut hits = SmallVec::new();
        self.collect(event_type, &mut hits);
        out.extend(hits.iter().map(|&(_, value)| value.clone()));
    }

    fn collect<'s>(&'s self, event_type: &str, hits: &mut Hits<'s, T>) {
        let _ = self.visit(event_type, |entries| {
            hits.extend(entries.iter().map(|e| (e.id, &e.value)));
            ControlFlow::Continue(())
        });
        // Each visited list is sorted already; a few runs of a few items sort in nanoseconds.
        hits.sort_unstable_by_key(|&(id, _)| id);
    }

    /// Whether any entry matches `event_type`; stops at the first.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let set: PatternSet<()> = [(Pattern::parse("audit.>")?, ())].into_iter().collect();
    /// assert!(set.is_match("audit.login"));
    /// assert!(!set.is_match("audit"));
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn is_match(&self, event_type: &str) -> bool {
        self.visit(event_type, |_| ControlFlow::Break(())).is_break()
    }

    /// Whether the entry `id` is in the set under `pattern`.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let p = Pattern::parse("a.*")?;
    /// let mut set = PatternSet::new();
    /// let id = set.insert(&p, ());
    /// assert!(set.contains(&p, id));
    /// assert!(!set.contains(&Pattern::parse("a.b")?, id));
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn contains(&self, pattern: &Pattern, id: EntryId) -> bool {
        self.entries_of(pattern).is_some_and(|entries| position(entries, id).is_some())
    }

    /// The list `pattern`'s entries are in, if its node exists.
    fn entries_of(&self, pattern: &Pattern) -> Option<&Entries<T>> {
        if pattern.is_match_all() {
            return Some(&self.match_all);
        }
        let (path, is_tail) = split_tail(pattern);
        let mut node = &*self.root;
        for segment in path {
            node = match segment {
                Segment::Literal(text) => node.literals.get(text)?,
                Segment::Star => node.star.as_ref()?,
                Segment::Tail => unreachable!("`>` is only ever last"),
            };
        }
        Some(if is_tail { &node.tail } else { &node.terminal })
    }

    /// Calls `found` with each non-empty list of entries that matches `event_type`, in no
    /// particular order, until it breaks. The trie walk is an explicit depth-first stack, so a
    /// match allocates nothing for types of up to `MAX_SEGMENTS` segments.
    fn visit<'s>(
        &'s self,
        event_type: &str,
        mut found: impl FnMut(&'s [Entry<T>]) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let mut report = |entries: &'s [Entry<T>]| {
            if entries.is_empty() { ControlFlow::Continue(()) } else { found(entries) }
        };
        report(&self.match_all)?;
        // A plain byte loop: types are short, and `str::split`'s searcher costs more than it
        // saves on them. Filled in place, as collecting would build the 512-byte array aside and
        // then copy it.
        let mut segments: SmallVec<[&str; MAX_SEGMENTS]> = SmallVec::new();
        let mut start = 0;
        for (i, byte) in event_type.bytes().enumerate() {
            if byte == b'.' {
                segments.push(&event_type[start..i]);
                start = i + 1;
            }
        }
        segments.push(&event_type[start..]);
        // Depth-first: each level leaves at most one sibling behind, so the stack never holds
        // more than `segments + 1` nodes.
        let mut stack: SmallVec<[(&'s Node<T>, usize); MAX_SEGMENTS + 1]> = SmallVec::new();
        stack.push((&self.root, 0));
        while let Some((node, depth)) = stack.pop() {
            let Some(segment) = segments.get(depth) else {
                report(&node.terminal)?;
                continue;
            };
            report(&node.tail)?;
            if let Some(star) = &node.star {
                stack.push((star, depth + 1));
            }
            if let Some(child) = node.literals.get(segment) {
                stack.push((child, depth + 1));
            }
        }
        ControlFlow::Continue(())
    }
}

impl<T: Clone> PatternSet<T> {
    /// Adds an entry and returns its id, greater than every id this set (or the set it was cloned
    /// from) handed out before. Copies only the nodes on `pattern`'s path that are shared with a
    /// clone; mutates in place otherwise.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let mut set = PatternSet::new();
    /// let p = Pattern::parse("orders.*")?;
    /// let a = set.insert(&p, 'a');
    /// let b = set.insert(&p, 'b');
    /// assert_eq!(set.matches("orders.paid").ids().collect::<Vec<_>>(), [a, b]);
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn insert(&mut self, pattern: &Pattern, value: T) -> EntryId {
        let id = EntryId(self.next_id);
        self.next_id += 1;
        let entry = Entry { id, value };
        if pattern.is_match_all() {
            Arc::make_mut(&mut self.match_all).push(entry);
        } else {
            let (path, is_tail) = split_tail(pattern);
            let mut node = Arc::make_mut(&mut self.root);
            for segment in path {
                let child = match segment {
                    Segment::Literal(text) => node.literals.get_or_insert(text),
                    Segment::Star => node.star.get_or_insert_with(Arc::default),
                    Segment::Tail => unreachable!("`>` is only ever last"),
                };
                node = Arc::make_mut(child);
            }
            if is_tail { &mut node.tail } else { &mut node.terminal }.push(entry);
        }
        self.len += 1;
        self.generation = next_generation();
        id
    }

    /// Removes the entry `id` inserted under `pattern` and returns its value, pruning nodes left
    /// empty. `None` (and no change, no new generation, nothing copied) if there is no such
    /// entry.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let p = Pattern::parse("a.>")?;
    /// let mut set = PatternSet::new();
    /// let id = set.insert(&p, "tail");
    /// assert_eq!(set.remove(&Pattern::parse("a.*")?, id), None);
    /// assert_eq!(set.remove(&p, id), Some("tail"));
    /// assert_eq!(set.remove(&p, id), None);
    /// assert!(set.is_empty());
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn remove(&mut self, pattern: &Pattern, id: EntryId) -> Option<T> {
        // Look before touching: a miss must not copy the path of a shared set.
        if !self.contains(pattern, id) {
            return None;
        }
        let value = if pattern.is_match_all() {
            take(Arc::make_mut(&mut self.match_all), id)
        } else {
            let (path, is_tail) = split_tail(pattern);
            remove_below(&mut self.root, path, is_tail, id)
        };
        debug_assert!(value.is_some(), "`contains` found the entry");
        self.len -= 1;
        self.generation = next_generation();
        value
    }
}

fn take<T>(entries: &mut Entries<T>, id: EntryId) -> Option<T> {
    position(entries, id).map(|i| entries.remove(i).value)
}

/// Removes entry `id` from the node at `path` below `node`, then drops the children it left empty.
fn remove_below<T: Clone>(
    node: &mut Arc<Node<T>>,
    path: &[Segment],
    is_tail: bool,
    id: EntryId,
) -> Option<T> {
    let node = Arc::make_mut(node);
    let Some((segment, rest)) = path.split_first() else {
        return take(if is_tail { &mut node.tail } else { &mut node.terminal }, id);
    };
    match segment {
        Segment::Literal(text) => {
            let child = node.literals.get_mut(text)?;
            let value = remove_below(child, rest, is_tail, id);
            if child.is_empty() {
                node.literals.remove(text);
            }
            value
        }
        Segment::Star => {
            let child = node.star.as_mut()?;
            let value = remove_below(child, rest, is_tail, id);
            if child.is_empty() {
                node.star = None;
            }
            value
        }
        Segment::Tail => unreachable!("`>` is only ever last"),
    }
}

impl<T> Clone for PatternSet<T> {
    /// O(1): the clone shares every node, and either side copies a path only when it changes.
    fn clone(&self) -> Self {
        Self {
            root: Arc::clone(&self.root),
            match_all: Arc::clone(&self.match_all),
            len: self.len,
            next_id: self.next_id,
            generation: self.generation,
        }
    }
}

impl<T> Default for PatternSet<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for PatternSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatternSet")
            .field("len", &self.len)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl<T: Clone> Extend<(Pattern, T)> for PatternSet<T> {
    fn extend<I: IntoIterator<Item = (Pattern, T)>>(&mut self, entries: I) {
        for (pattern, value) in entries {
            self.insert(&pattern, value);
        }
    }
}

impl<T: Clone> FromIterator<(Pattern, T)> for PatternSet<T> {
    /// Builds a set in place (nothing is shared yet, so nothing is copied), ids in iteration
    /// order.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let set: PatternSet<u8> = ["a.*", "a.b", "*"]
    ///     .iter()
    ///     .zip(1..)
    ///     .map(|(p, v)| Ok((Pattern::parse(p)?, v)))
    ///     .collect::<Result<_, eventbroker::PatternError>>()?;
    /// assert_eq!(set.matches("a.b").values().copied().collect::<Vec<_>>(), [1, 2, 3]);
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    fn from_iter<I: IntoIterator<Item = (Pattern, T)>>(entries: I) -> Self {
        let mut set = Self::new();
        set.extend(entries);
        set
    }
}

/// The result of [`PatternSet::matches`]: `(id, value)` pairs in [`EntryId`] order, stored
/// inline for up to [`INLINE`](Self::INLINE) of them. Derefs to a slice.
///
/// ```
/// use eventbroker::{Pattern, PatternSet};
///
/// let set: PatternSet<&str> = [(Pattern::parse("a.*")?, "x"), (Pattern::parse("*")?, "y")]
///     .into_iter()
///     .collect();
/// let hits = set.matches("a.b");
/// assert_eq!(hits.values().collect::<Vec<_>>(), [&"x", &"y"]);
/// for (id, value) in &hits {
///     println!("{id}: {value}");
/// }
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
pub struct Matches<'s, T> {
    hits: Hits<'s, T>,
}

type Hits<'s, T> = SmallVec<[(EntryId, &'s T); INLINE_MATCHES]>;

impl<'s, T> Matches<'s, T> {
    /// How many results fit without a heap allocation.
    pub const INLINE: usize = INLINE_MATCHES;

    /// The matched values, in id order.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let set: PatternSet<i32> = [(Pattern::parse("*")?, 7)].into_iter().collect();
    /// assert_eq!(set.matches("x").values().sum::<i32>(), 7);
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn values(&self) -> impl ExactSizeIterator<Item = &'s T> + '_ {
        self.hits.iter().map(|&(_, value)| value)
    }

    /// The matched ids, ascending.
    ///
    /// ```
    /// use eventbroker::{Pattern, PatternSet};
    ///
    /// let mut set = PatternSet::new();
    /// let id = set.insert(&Pattern::parse("x")?, ());
    /// assert_eq!(set.matches("x").ids().collect::<Vec<_>>(), [id]);
    /// # Ok::<(), eventbroker::PatternError>(())
    /// ```
    pub fn ids(&self) -> impl ExactSizeIterator<Item = EntryId> + '_ {
        self.hits.iter().map(|&(id, _)| id)
    }
}

impl<'s, T> Deref for Matches<'s, T> {
    type Target = [(EntryId, &'s T)];

    fn deref(&self) -> &Self::Target {
        &self.hits
    }
}

impl<'s, T> IntoIterator for Matches<'s, T> {
    type Item = (EntryId, &'s T);
    type IntoIter = smallvec::IntoIter<[(EntryId, &'s T); INLINE_MATCHES]>;

    fn into_iter(self) -> Self::IntoIter {
        self.hits.into_iter()
    }
}

impl<'m, 's, T> IntoIterator for &'m Matches<'s, T> {
    type Item = &'m (EntryId, &'s T);
    type IntoIter = std::slice::Iter<'m, (EntryId, &'s T)>;

    fn into_iter(self) -> Self::IntoIter {
        self.hits.iter()
    }
}

impl<T: fmt::Debug> fmt::Debug for Matches<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.hits.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    fn values<T: Clone>(set: &PatternSet<T>, event_type: &str) -> Vec<T> {
        set.matches(event_type).values().cloned().collect()
    }

    #[test]
    fn results_come_in_insertion_order_whatever_the_node() {
        let mut set = PatternSet::new();
        for (i, pattern) in ["*", "a.>", "a.b.c", "*.b.*", ">", "a.*.c", "a.b.c", "*.*.*"].iter().enumerate()
        {
            set.insert(&p(pattern), i);
        }
        assert_eq!(values(&set, "a.b.c"), (0..8).collect::<Vec<_>>());
        assert_eq!(values(&set, "a.b"), [0, 1, 4]);
        assert_eq!(values(&set, "x"), [0, 4]);
        assert_eq!(values(&set, "x.b.y"), [0, 3, 4, 7]);
    }

    #[test]
    fn duplicates_are_separate_entries() {
        let mut set = PatternSet::new();
        let a = set.insert(&p("a.b"), "v");
        let b = set.insert(&p("a.b"), "v");
        assert_ne!(a, b);
        assert_eq!(values(&set, "a.b"), ["v", "v"]);
        assert_eq!(set.remove(&p("a.b"), a), Some("v"));
        assert_eq!(set.matches("a.b").ids().collect::<Vec<_>>(), [b]);
    }

    #[test]
    fn remove_needs_the_right_pattern_and_prunes() {
        let mut set = PatternSet::new();
        let deep = set.insert(&p("a.b.c.d"), 1);
        let star = set.insert(&p("a.*.c"), 2);
        assert_eq!(set.remove(&p("a.b.c"), deep), None);
        assert_eq!(set.remove(&p("a.b.c.d"), star), None);
        assert_eq!(set.remove(&p("a.b.c.d"), deep), Some(1));
        assert_eq!(set.remove(&p("a.*.c"), star), Some(2));
        assert!(set.is_empty());
        assert!(set.root.is_empty(), "every node was pruned");
    }

    #[test]
    fn literal_edges_move_to_a_map_and_keep_working() {
        let mut set = PatternSet::new();
        let n = INLINE_LITERALS * 3;
        let ids: Vec<_> = (0..n).map(|i| set.insert(&p(&format!("s{i}.x")), i)).collect();
        assert!(matches!(set.root.literals, Literals::Map(_)));
        for i in 0..n {
            assert_eq!(values(&set, &format!("s{i}.x")), [i]);
        }
        for (i, id) in ids.into_iter().enumerate() {
            assert_eq!(set.remove(&p(&format!("s{i}.x")), id), Some(i));
        }
        assert!(set.root.is_empty());
    }

    #[test]
    fn very_wide_nodes_shard_and_copy_one_shard() {
        let mut set = PatternSet::new();
        let n = SHARDED_LITERALS * 3;
        let ids: Vec<_> = (0..n).map(|i| set.insert(&p(&format!("s{i}.x")), i)).collect();
        let Literals::Sharded(shards) = &set.root.literals else { panic!("not sharded") };
        assert!(shards.iter().all(|shard| !shard.is_empty()), "keys spread over every shard");
        for i in 0..n {
            assert_eq!(values(&set, &format!("s{i}.x")), [i]);
        }
        assert!(set.matches("s.x").is_empty());

        let snapshot = set.clone();
        set.insert(&p("s7.y"), n);
        let (Literals::Sharded(old), Literals::Sharded(new)) = (&snapshot.root.literals, &set.root.literals)
        else {
            panic!("still sharded")
        };
        let shared = old.iter().zip(new.iter()).filter(|(a, b)| Arc::ptr_eq(a, b)).count();
        assert_eq!(shared, SHARDS - 1, "only the changed shard was copied");
        assert_eq!(values(&set, "s7.y"), [n]);
        assert!(snapshot.matches("s7.y").is_empty());

        for (i, id) in ids.into_iter().enumerate() {
            assert_eq!(set.remove(&p(&format!("s{i}.x")), id), Some(i));
        }
        assert_eq!(values(&set, "s7.y"), [n]);
        assert_eq!(values(&snapshot, "s7.x"), [7]);
    }

    #[test]
    fn match_all_and_tails() {
        let mut set = PatternSet::new();
        set.insert(&p("*"), "all");
        set.insert(&p(">"), "tail");
        set.insert(&p("a.>"), "a-tail");
        set.insert(&p("*.>"), "two-or-more");
        assert_eq!(values(&set, "a"), ["all", "tail"]);
        assert_eq!(values(&set, "a.b"), ["all", "tail", "a-tail", "two-or-more"]);
        assert_eq!(values(&set, "b.c.d.e"), ["all", "tail", "two-or-more"]);
        // Unvalidated input matches what the reference matcher says it matches.
        assert_eq!(values(&set, ""), ["all", "tail"]);
        assert_eq!(values(&set, "a..b"), ["all", "tail", "a-tail", "two-or-more"]);
    }

    #[test]
    fn path_copy_leaves_the_old_clone_unchanged() {
        let mut set = PatternSet::new();
        let keep = set.insert(&p("a.b.c"), 1);
        let gone = set.insert(&p("a.*.c"), 2);
        set.insert(&p("x.y"), 3);
        let snapshot = set.clone();
        assert!(Arc::ptr_eq(&set.root, &snapshot.root));

        set.insert(&p("a.b.d"), 4);
        set.remove(&p("a.*.c"), gone);
        assert_eq!(values(&snapshot, "a.b.c"), [1, 2]);
        assert_eq!(values(&set, "a.b.c"), [1]);
        assert_eq!(values(&set, "a.b.d"), [4]);
        assert!(snapshot.matches("a.b.d").is_empty());
        assert_eq!((snapshot.len(), set.len()), (3, 3));

        // The untouched branch is still shared; the changed path was copied.
        let x = |s: &PatternSet<i32>| Arc::clone(s.root.literals.get("x").unwrap());
        assert!(Arc::ptr_eq(&x(&set), &x(&snapshot)));
        let a = |s: &PatternSet<i32>| Arc::clone(s.root.literals.get("a").unwrap());
        assert!(!Arc::ptr_eq(&a(&set), &a(&snapshot)));
        assert!(snapshot.contains(&p("a.b.c"), keep) && set.contains(&p("a.b.c"), keep));
    }

    #[test]
    fn unshared_sets_change_in_place() {
        let mut set = PatternSet::new();
        set.insert(&p("a.b"), 1);
        let root = Arc::as_ptr(&set.root);
        set.insert(&p("a.c"), 2);
        assert_eq!(Arc::as_ptr(&set.root), root);
    }

    #[test]
    fn failed_remove_copies_nothing_and_keeps_the_generation() {
        let mut set = PatternSet::new();
        let id = set.insert(&p("a.b"), 1);
        let snapshot = set.clone();
        let generation = set.generation();
        assert_eq!(set.remove(&p("a.c"), id), None);
        assert_eq!(set.remove(&p("a.b"), EntryId(99)), None);
        assert_eq!(set.generation(), generation);
        assert!(Arc::ptr_eq(&set.root, &snapshot.root));
    }

    #[test]
    fn every_change_draws_a_new_generation() {
        let mut set = PatternSet::new();
        let mut seen = vec![set.generation()];
        let id = set.insert(&p("a"), ());
        seen.push(set.generation());
        let mut other = set.clone();
        assert_eq!(other.generation(), set.generation());
        other.insert(&p("b"), ());
        seen.push(other.generation());
        set.remove(&p("a"), id);
        seen.push(set.generation());
        seen.push(PatternSet::<()>::new().generation());
        let mut unique = seen.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "{seen:?}");
    }

    #[test]
    fn ids_keep_growing_across_clones_and_removals() {
        let mut set = PatternSet::new();
        let a = set.insert(&p("a"), ());
        set.remove(&p("a"), a);
        let mut clone = set.clone();
        let b = clone.insert(&p("a"), ());
        assert!(b > a);
    }

    #[test]
    fn is_match_agrees_with_matches() {
        let set: PatternSet<()> = ["a.*.c", "b.>"].iter().map(|s| (p(s), ())).collect();
        for t in ["a.b.c", "a.b", "b", "b.c", "c"] {
            assert_eq!(set.is_match(t), !set.matches(t).is_empty(), "{t}");
        }
    }

    #[test]
    fn long_types_still_match() {
        let deep = vec!["s"; MAX_SEGMENTS].join(".");
        let set: PatternSet<u8> = [(p(&deep), 1), (p("s.>"), 2)].into_iter().collect();
        assert_eq!(values(&set, &deep), [1, 2]);
        // Past the limit (not a valid type) the split spills to the heap but stays correct.
        let deeper = vec!["s"; MAX_SEGMENTS * 2].join(".");
        assert_eq!(values(&set, &deeper), [2]);
    }
}
