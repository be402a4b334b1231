//! The in-process provider: bounded, least-recently-used eviction, expiry of finished events.
//!
//! Nothing survives [`Provider::close`] or the process; use it for development, tests and
//! single-instance deployments. Stores, reads and stats cost:
//!
//! | operation | cost |
//! |---|---|
//! | `store_batch` | O(1) per event: a push into its shard's ring; an id not above every id the shard has held (another generator's, or one stored before) first looks in the shard's index by id |
//! | `update_status_batch` | O(1) per update: an index probe under the shard's lock, then a write of the event's status mark, a cache line of its own beside the table, never a copy of the event (the broker's workers skip the probe and the lock: they write with the ticket of each event's store) |
//! | `get`, `delete` | O(1) (`get` moves the event to the head of its shard's ring) |
//! | `list` | O(n) scan of the stored events, then a sort of the matches |
//! | `replay` | O(n) scan of the stored events, then a sort of the first `limit` selected |
//! | `stats` | O(n): a pass over the stored events' statuses |
//!
//! A shard's index by id is filled lazily: what reads by id (`get`, `delete`, an update without a
//! ticket, a store of an id not above all before) first puts in the events stored since the last
//! such read, so its cost is O(1) per event stored, paid once; the broker's own flow never reads
//! by id and never fills it. Each `get` moves its event to the head of the shard's ring, leaving a
//! hole; a ring full of holes is compacted in one pass.
//!
//! The events are split into shards by the low bits of their ids (16 of them from 4 096 events up,
//! one below), each with its own lock. The ids one thread makes fall into two shards of their own
//! (see [`EventId::new`]), so threads publishing at once store into different shards and never
//! meet on a lock or a cache line; the provider is cheap enough to be written inline by the threads
//! that publish and handle events ([`Capabilities::inline_writes`]), without a writer thread in
//! between.
//!
//! ## Bounds
//! - At most [`MemoryConfig::max_events`] events (10 000 by default), exactly, shared by the
//!   shards. Storing one more evicts the least recently used event of its shard: storing and `get`
//!   count as use; status updates, `list`, `replay` and `stats` do not (in the broker's flow, events
//!   leave in the order they were stored unless read). Below 4 096 that is the least recently used
//!   of all. From there, a store takes from another shard instead when that one holds more than a
//!   sixty-fourth of the bound more events (a thread that starts storing takes room from those in
//!   use until they hold about as many), or when nothing has been stored into it for `max_events`
//!   stores (a thread that stopped storing gives its events up first); it takes up to 16 at once,
//!   and the stores after it fill that room without evicting. So a thread alone keeps
//!   `max_events` of its latest events, and threads storing at once share the bound evenly.
//!   Eviction ignores status, so an event still pending can be evicted; size the bound above the
//!   number of events in flight. An evicted event that nobody else references (the broker's, once
//!   handled) is freed a few evictions later, at most eight waiting a shard, so that a thread does
//!   not build its next events in the order of the allocations it built them in before (one
//!   publisher with one worker ran at two thirds of its speed when it did); one that somebody
//!   still holds is let go of by the time the store returns.
//! - Completed and failed events created more than [`MemoryConfig::max_age`] ago (24 h by
//!   default) are removed by a background thread, `eventbroker-memory-cleanup`, that wakes every
//!   [`MemoryConfig::cleanup_interval`] (1 min by default), and by
//!   [`MemoryProvider::cleanup_now`]. Pending and processing events never expire.
//! - At most [`MemoryConfig::max_dead_letters`] dead letters (10 000 by default); beyond that the
//!   one that failed earliest is dropped.
//!
//! Evictions, expiries, re-stores, dropped dead letters and events skipped by full streams are
//! counted in [`ProviderStats::provider_specific`] as `evicted`, `expired`, `replaced`,
//! `dead_letters_dropped` and `streams_missed`, next to `max_events`.
//!
//! ```
//! use std::sync::Arc;
//! use eventbroker::{Event, EventSink, EventSource, EventStore, MemoryConfig, MemoryProvider, ProviderStats};
//!
//! let provider = MemoryProvider::new(MemoryConfig { max_events: 2, ..MemoryConfig::default() });
//! let [a, b, c] = ["a.x", "b.x", "c.x"].map(|t| Arc::new(Event::new(EventSource::System, t)));
//! provider.store_batch(&[Arc::clone(&a), Arc::clone(&b)], None)?;
//! provider.get(a.id)?; // `a` is now more recently used than `b`
//! provider.store_batch(&[Arc::clone(&c)], None)?;
//! assert!(provider.get(b.id)?.is_none()); // `b` was evicted
//! assert!(provider.get(a.id)?.is_some());
//! assert_eq!(provider.stats()?.provider_specific["evicted"], 1);
//! # Ok::<(), eventbroker::ProviderError>(())
//! ```
//!
//! ## The in-process bus
//! Brokers that share one `MemoryProvider` (each given the same `Arc`) receive each other's events
//! exactly as instances sharing a Redis, NATS or PostgreSQL server do: fan-out or work-queue
//! groups, no echo, redelivery of what a vanished member fetched and never acknowledged after
//! [`InboundConfig::claim_idle`], filters applied before anything is handed out. Once a first group
//! exists, every newly stored event is also appended to the bus's log (a shared reference, not a
//! copy), which keeps what some group still has to read, at most [`MemoryConfig::max_events`]
//! entries: a group that falls further behind loses the oldest, counted as `bus_lost` (its own
//! events among them as `bus_echoes_skipped`, those none of its members wants as `bus_filtered`,
//! as a fetch would have counted them). Redeliveries, skipped echoes and filtered events are
//! counted as `bus_redelivered`, `bus_echoes_skipped` and `bus_filtered`, next to `bus_pending` and
//! `bus_logged`; hand-outs in [`ProviderStats::events_consumed`]. Without groups (a broker alone
//! with its own provider) nothing of the bus costs anything.

use std::collections::BTreeMap;
use std::mem;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use jiff::Timestamp;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use smallvec::SmallVec;

use self::bus::{Bell, Bus, SourceId};
use self::letters::LetterTable;
use self::linger::Lingering;
use self::marks::Marks;
use self::table::{EventTable, status_index};
use super::{
    Ack, AckToken, Capabilities, ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter,
    EventSink, EventStore, EventStream, Inbound, InboundConfig, InboundEvent, Provider, ProviderStats,
    ReplayFrom, ReplayPage, StatusUpdate, StoredEvent, StreamHub, closed_error,
};
use crate::error::ProviderError;
use crate::event::{Event, EventId, EventStatus};
use crate::pattern::Pattern;
use crate::sync::thread;

mod bus;
mod index;
mod letters;
mod linger;
mod log;
mod marks;
#[cfg(eventbroker_loom)]
pub(crate) use marks::Mark;
mod table;

const NAME: &str = "memory";

/// Shards of a provider holding at least [`SHARDED_FROM`] events.
const SHARDS: usize = 16;
const _: () = assert!(SHARDS.is_power_of_two(), "`shard_of` masks the id's low bits");
const _: () = assert!(SHARDS <= 32, "a `u32` mask holds a bit per shard");
/// Below this bound, one shard: least-recently-used eviction is then exact over every event.
const SHARDED_FROM: usize = 4096;
/// Updates per call that [`Shared::group_by_shard`] groups without allocating: a worker's largest
/// write at the default settings (one batch's completions with the next one's `processing`,
/// 2 × 256).
const GROUPED_INLINE: usize = 512;
/// Most evicted events a `store_batch` holds before it releases its shard and drops them.
const EVICTED_HELD: usize = 64;
/// Evictions a shard makes before it looks again at the other shards ([`Shared::victim_shard`]).
const LOOK_EVERY: u32 = 64;
/// Most events a store evicts from another shard at once.
const TAKE_AT_ONCE: usize = 16;

/// Settings of a [`MemoryProvider`]. A broker given one for its settings alone, shared with no
/// other broker, is built with [`Distribution::Local`](crate::Distribution::Local) (see
/// [`BrokerBuilder::provider`](crate::BrokerBuilder::provider)).
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use eventbroker::{Broker, Distribution, MemoryConfig, MemoryProvider};
///
/// let config = MemoryConfig { max_events: 100_000, max_age: Some(Duration::from_secs(3600)), ..MemoryConfig::default() };
/// assert_eq!(config.cleanup_interval, Some(Duration::from_secs(60)));
/// let broker = Broker::builder()
///     .provider(Arc::new(MemoryProvider::new(config)))
///     .distribution(Distribution::Local)
///     .build()?;
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Most events kept; storing more evicts the least recently used. Default 10 000. With 0 an
    /// event is evicted as soon as it is stored (streams still receive it). The bus's log shares
    /// the bound (see the [module docs](self)): with 0, consumer groups receive nothing, each
    /// event counted as `bus_lost`, so brokers that share the provider need a bound above 0.
    /// Nothing is allocated ahead for the bound: memory grows with the events held, so any number
    /// may be given, up to `usize::MAX` for one that is never reached.
    pub max_events: usize,
    /// Completed and failed events created longer ago than this are removed by cleanup. Default
    /// 24 hours; `None` keeps them until evicted.
    pub max_age: Option<Duration>,
    /// How often the background cleanup runs. Default 1 minute; `None` runs no background thread
    /// (call [`MemoryProvider::cleanup_now`] instead). An interval under a millisecond is taken as
    /// one, so the thread never runs without pause.
    pub cleanup_interval: Option<Duration>,
    /// Events each [`EventStream`] buffers before it lags. Default 1024; at least 1.
    pub stream_capacity: usize,
    /// Most dead letters kept; storing more drops the one that failed earliest. Default 10 000.
    pub max_dead_letters: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_age: Some(Duration::from_secs(24 * 60 * 60)),
            cleanup_interval: Some(Duration::from_secs(60)),
            stream_capacity: 1024,
            max_dead_letters: 10_000,
        }
    }
}

/// The in-process [`Provider`]; see the [module docs](self) for its bounds and costs.
///
/// Thread-safe: the events live in shards, each behind its own read-write lock held only for the
/// index work itself (a store that evicts from another shard only tries that shard's lock);
/// status updates go to a mark per event slot, each under a lock of its own, which reads apply
/// (see `marks`); dead letters and the bus have locks of their own;
/// events are copied out and streams fed after the locks are released. `close` (also run on drop)
/// stops the cleanup thread and joins it; it never waits longer than one cleanup pass.
pub struct MemoryProvider {
    shared: Arc<Shared>,
    cleaner: Mutex<Option<Cleaner>>,
}

struct Shared {
    config: MemoryConfig,
    shards: Box<[RwLock<Shard>]>,
    letters: RwLock<Letters>,
    bus: Mutex<Bus>,
    /// Whether any consumer group exists: read on every store, without the bus's lock. Once true,
    /// always true (groups are durable).
    bus_active: AtomicBool,
    /// The next sequence number. Taken under the lock of the shard the event goes to, so each
    /// shard's numbers increase. A line of its own: every store writes it, and the fields every
    /// call reads (`closed`, `bus_active`) would otherwise be fetched back after each store.
    next_seq: CachePadded<AtomicU64>,
    /// Events held, in all shards: at most `max_events`. Only stores below the bound and removals
    /// write it, so the stores of a full provider (each evicting one) only read it.
    held: CachePadded<AtomicUsize>,
    /// What each shard shows the others, to choose where a store evicts (see
    /// [`Shared::victim_shard`]).
    gauges: Box<[CachePadded<Gauge>]>,
    /// Set by `close`, after every shard and the letters are closed under their locks.
    closed: AtomicBool,
    /// Slots a shard's ring grows to at most (see [`table::max_capacity`]).
    ring_capacity: usize,
    /// Each shard's status changes, by slot (see [`marks`]).
    marks: Box<[Marks]>,
    hub: StreamHub,
    /// Rung when events that some consumer group may want are stored.
    bell: Bell,
}

struct Shard {
    closed: bool,
    events: EventTable,
    /// The sequence number of its latest store; 0 before the first.
    newest: u64,
    /// Where this shard's stores evict instead of their own shard, as of the last look.
    victim: Option<Victim>,
    /// Evictions until the next look.
    look_in: u32,
    published: u64,
    replaced: u64,
    evicted: u64,
    expired: u64,
    /// Events evicted by its stores that nobody else references, freed a few evictions late (see
    /// [`linger`]).
    lingering: Lingering,
}

/// What a shard shows the others: written under its lock, read without it.
#[derive(Default)]
struct Gauge {
    /// Events held.
    len: AtomicUsize,
    /// The sequence number of its latest store; 0 before the first.
    newest: AtomicU64,
}

/// A shard that evicting stores take from instead of their own (see [`Shared::victim_shard`]).
#[derive(Clone, Copy)]
struct Victim {
    index: usize,
    /// Nothing has been stored into it for `max_events` stores.
    stale: bool,
}

struct Letters {
    closed: bool,
    table: LetterTable,
}

/// The shortest pause between background cleanups, whatever the config says.
const MIN_CLEANUP_INTERVAL: Duration = Duration::from_millis(1);

/// The background cleanup thread and the channel that stops it.
struct Cleaner {
    /// Dropping it wakes the thread, which then exits.
    stop: flume::Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl MemoryProvider {
    /// A provider with `config`; starts the cleanup thread when both `max_age` and
    /// `cleanup_interval` are set.
    pub fn new(config: MemoryConfig) -> Self {
        let interval = config
            .cleanup_interval
            .filter(|_| config.max_age.is_some())
            .map(|interval| interval.max(MIN_CLEANUP_INTERVAL));
        let count = if config.max_events < SHARDED_FROM { 1 } else { SHARDS };
        let ring_capacity = table::max_capacity(config.max_events);
        let shards = (0..count)
            .map(|_| {
                RwLock::new(Shard {
                    closed: false,
                    events: EventTable::new(ring_capacity),
                    newest: 0,
                    victim: None,
                    look_in: 0,
                    published: 0,
                    replaced: 0,
                    evicted: 0,
                    expired: 0,
                    lingering: Lingering::default(),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            letters: RwLock::new(Letters { closed: false, table: LetterTable::new() }),
            bus: Mutex::new(Bus::new(config.max_events)),
            bus_active: AtomicBool::new(false),
            next_seq: CachePadded::new(AtomicU64::new(1)),
            held: CachePadded::new(AtomicUsize::new(0)),
            gauges: (0..count).map(|_| CachePadded::new(Gauge::default())).collect(),
            closed: AtomicBool::new(false),
            ring_capacity,
            marks: (0..count).map(|_| Marks::new()).collect(),
            hub: StreamHub::new(config.stream_capacity),
            bell: Bell::default(),
            config,
        });
        let cleaner = interval.and_then(|interval| Cleaner::start(Arc::downgrade(&shared), interval));
        Self { shared, cleaner: Mutex::new(cleaner) }
    }

    /// The settings in use.
    pub fn config(&self) -> &MemoryConfig {
        &self.shared.config
    }

    /// Removes completed and failed events created more than `max_age` ago, now, rather than on
    /// the next tick of the cleanup thread; returns how many were removed (0 when `max_age` is
    /// `None`).
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`](crate::ProviderErrorKind::Closed) after `close`.
    pub fn cleanup_now(&self) -> Result<usize, ProviderError> {
        self.shared.cleanup(Timestamp::now(), "cleanup_now")
    }

    /// Opens a stream of the events stored through this provider from now on whose type matches
    /// `pattern`: local tailing, in store order per storing thread. Events stored before the call
    /// are not delivered; use [`EventStore::replay`] for those. See [`EventStream`] for what
    /// happens when the stream is full. (Other brokers' events reach a broker through
    /// [`Provider::open_inbound`].)
    ///
    /// ```
    /// use std::sync::Arc;
    /// use eventbroker::{Event, EventSink, EventSource, MemoryProvider, Pattern};
    ///
    /// let provider = MemoryProvider::default();
    /// let mut stream = provider.stream(&Pattern::parse("audit.>")?)?;
    /// provider.store_batch(&[Arc::new(Event::new(EventSource::System, "audit.login"))], None)?;
    /// assert_eq!(stream.try_recv()?.event_type, "audit.login");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`](crate::ProviderErrorKind::Closed) after [`Provider::close`].
    pub fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError> {
        // Opened under the letters' lock, which `close` takes too: `close` either ends this stream
        // or refuses it.
        let letters = self.shared.letters.read();
        if letters.closed {
            return Err(closed_error(NAME, "stream"));
        }
        let stream = self.shared.hub.open(pattern.clone());
        drop(letters);
        Ok(stream)
    }
}

impl Default for MemoryProvider {
    /// A provider with [`MemoryConfig::default`].
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl Drop for MemoryProvider {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl std::fmt::Debug for MemoryProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let events: usize = self.shared.shards.iter().map(|s| s.read().events.len()).sum();
        f.debug_struct("MemoryProvider")
            .field("config", &self.shared.config)
            .field("shards", &self.shared.shards.len())
            .field("events", &events)
            .field("dead_letters", &self.shared.letters.read().table.len())
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The shard an event id lives in, by its low bits: a lane of the thread that made it, for
    /// ours (see [`crate::id`]), random for UUID v4 (the Go seed's).
    fn shard_of(&self, id: EventId) -> usize {
        #[allow(clippy::cast_possible_truncation, reason = "only the low bits pick the shard")]
        let low = id.as_uuid().as_u128() as usize;
        // A mask rather than `%`: the count is a power of two (1 or `SHARDS`).
        low & (self.shards.len() - 1)
    }

    fn shard(
        &self,
        index: usize,
        operation: &'static str,
    ) -> Result<RwLockWriteGuard<'_, Shard>, ProviderError> {
        let shard = self.shards[index].write();
        if shard.closed { Err(closed_error(NAME, operation)) } else { Ok(shard) }
    }

    /// Runs `f` on each shard (with its index) under its read lock, unless closed.
    fn each_shard<T>(
        &self,
        operation: &'static str,
        mut f: impl FnMut(usize, &Shard) -> T,
    ) -> Result<Vec<T>, ProviderError> {
        self.shards
            .iter()
            .enumerate()
            .map(|(index, shard)| {
                let shard = shard.read();
                if shard.closed { Err(closed_error(NAME, operation)) } else { Ok(f(index, &shard)) }
            })
            .collect()
    }

    /// `updates` grouped by shard: their indices into `order`, shard 0's first, each shard's in
    /// the order written; returns where each shard's run ends in `order` (it starts where the one
    /// before ends).
    ///
    /// One pass counts, one places: a worker's write spread over all 16 shards (8 publishers, two
    /// lanes each) reads its updates twice, not once per shard. The caller owns `order`, so that
    /// its inline bytes are never copied on return.
    fn group_by_shard(
        &self,
        updates: &[StatusUpdate],
        order: &mut SmallVec<[u32; GROUPED_INLINE]>,
    ) -> [u32; SHARDS] {
        let shards: SmallVec<[u8; GROUPED_INLINE]> = updates
            .iter()
            .map(|update| u8::try_from(self.shard_of(update.id)).expect("at most 32 shards"))
            .collect();
        let mut counts = [0u32; SHARDS];
        for &shard in &shards {
            counts[usize::from(shard)] += 1;
        }
        // Where each shard's next index goes: its run's start, and once all are placed, its end.
        let mut next = [0u32; SHARDS];
        let mut start = 0;
        for (next, count) in next.iter_mut().zip(counts) {
            *next = start;
            start += count;
        }
        order.resize(updates.len(), 0);
        for (at, &shard) in shards.iter().enumerate() {
            let next = &mut next[usize::from(shard)];
            order[*next as usize] = u32::try_from(at).expect("a status batch holds fewer than 2^32 updates");
            *next += 1;
        }
        next
    }

    /// Writes `updates`, written when `next_seq` was `written_at`, each to its event's mark: each
    /// shard's lock once, to find them (a write lock: finding an event by id may first catch the
    /// shard's index up, see [`table`]); an update of an event not stored, or stored again since
    /// (at `written_at` or later), is dropped.
    fn update_by_id(
        &self,
        updates: &[StatusUpdate],
        written_at: u64,
        operation: &'static str,
    ) -> Result<(), ProviderError> {
        let mut order = SmallVec::new();
        let ends = self.group_by_shard(updates, &mut order);
        for (index, mine) in each_shard_in(&order, &ends) {
            let mut shard = self.shard(index, operation)?;
            for update in mine.iter().map(|&at| &updates[at as usize]) {
                self.claim_by_id(index, &mut shard, update, |stored_at| stored_at < written_at);
            }
        }
        Ok(())
    }

    /// Writes `update` to the mark of its event, found by id in shard `index` (held as `shard`),
    /// when `applies` accepts the number the event's latest store took; dropped when the event is
    /// not stored, or `applies` refuses.
    fn claim_by_id(
        &self,
        index: usize,
        shard: &mut Shard,
        update: &StatusUpdate,
        applies: impl FnOnce(u64) -> bool,
    ) {
        if let Some(found) = shard.events.locate(update.id)
            && applies(found.stored_at)
        {
            self.marks[index].claim(found.slot, found.marked, update);
        }
    }

    /// Counts one more event held, unless `max_events` are: then `false`, and the caller evicts
    /// one for it.
    fn take_room(&self) -> bool {
        // Relaxed: a count changed only by read-modify-writes, which keep it exact; it orders no
        // other memory. A full provider's stores only load it.
        let max = self.config.max_events;
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| (held < max).then_some(held + 1))
            .is_ok()
    }

    /// Counts `count` events removed, not evicted for a store.
    fn release_room(&self, count: usize) {
        if count > 0 {
            // Relaxed: see `take_room`.
            self.held.fetch_sub(count, Ordering::Relaxed);
        }
    }

    /// Publishes shard `index`'s gauge, as `shard` is now.
    fn publish_gauge(&self, index: usize, shard: &Shard) {
        // Relaxed: hints; an eviction that acts on them checks them again under that shard's lock.
        self.gauges[index].len.store(shard.events.len(), Ordering::Relaxed);
        self.gauges[index].newest.store(shard.newest, Ordering::Relaxed);
    }

    /// Whether a shard whose latest store took `newest` has had none for `max_events` stores, at
    /// `now` (the latest number taken).
    fn is_stale(&self, newest: u64, now: u64) -> bool {
        newest.saturating_add(self.config.max_events as u64) < now
    }

    /// How many more events than the evicting shard another shard holds before the evicting shard
    /// takes from it: shards a sixty-fourth of `max_events` apart (every shard, for random ids)
    /// evict their own.
    fn margin(&self) -> usize {
        self.config.max_events / 64
    }

    /// Evicts one event for an event just stored, with number `now`, in shard `index`, held as
    /// `own`: the least recently used of `own`, unless [`Shared::victim_shard`] names another shard,
    /// free at once, that still qualifies under its lock (up to [`TAKE_AT_ONCE`] from it, the room
    /// of all but one left to the next stores). What is evicted is parked in `own` (see
    /// [`linger`]) or goes to `evicted`, with what parking displaced, to be dropped with the locks
    /// released.
    fn evict_for_store(
        &self,
        index: usize,
        own: &mut Shard,
        now: u64,
        evicted: &mut SmallVec<[Arc<Event>; 1]>,
    ) {
        if let Some(victim) = self.victim_shard(index, own, now) {
            // Never waits with a shard's lock held (two stores taking from each other's shards
            // would deadlock): a busy shard is left to the next eviction.
            if let Some(mut shard) = self.shards[victim.index].try_write() {
                let own_len = own.events.len();
                let mut taken = 0;
                while taken < TAKE_AT_ONCE
                    && if victim.stale {
                        self.is_stale(shard.newest, now)
                    } else {
                        shard.events.len() > own_len + taken + self.margin()
                    }
                    && let Some(event) = shard.events.evict_least_recent()
                {
                    evicted.extend(own.lingering.park(event, now.wrapping_add(taken as u64)));
                    taken += 1;
                }
                if taken > 0 {
                    shard.evicted += taken as u64;
                    // A shard taken from until empty (its thread stopped storing) gives its
                    // capacity back too: over time every lane's shards fill once.
                    let emptied = (shard.events.len() == 0)
                        .then(|| mem::replace(&mut shard.events, EventTable::new(self.ring_capacity)));
                    self.publish_gauge(victim.index, &shard);
                    drop(shard);
                    drop(emptied);
                    self.release_room(taken - 1);
                    return;
                }
            }
            own.look_in = 0; // Look again at the next eviction.
        }
        if let Some(event) = own.events.evict_least_recent() {
            own.evicted += 1;
            evicted.extend(own.lingering.park(event, now));
        } else {
            debug_assert!(false, "the shard holds the event just stored");
            // Relaxed: see `take_room`.
            self.held.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The shard a store into shard `index` (held as `own`) evicts from instead of its own, as of
    /// the last look, taken again every [`LOOK_EVERY`] evictions: the stale shard (see
    /// [`Shared::is_stale`]) whose latest store is the oldest, else the shard holding the most
    /// events if that is more than [`Shared::margin`] above `own`.
    ///
    /// Ids one thread makes fall into two of the 16 shards (see [`crate::id`]), so each publisher
    /// stores into shards of its own, and each shard evicts its own least recently used: two
    /// publishers never touch each other's shards. The bound is the provider's, though: a thread
    /// that starts storing takes room from the shards in use until it holds as many, and the
    /// events of a thread that stopped are the first to go once they are stale.
    fn victim_shard(&self, index: usize, own: &mut Shard, now: u64) -> Option<Victim> {
        if own.look_in > 0 {
            own.look_in -= 1;
            return own.victim;
        }
        own.look_in = LOOK_EVERY;
        // Relaxed: hints (see `publish_gauge`).
        let gauges =
            self.gauges.iter().enumerate().filter(|&(other, _)| other != index).map(|(other, gauge)| {
                (other, gauge.len.load(Ordering::Relaxed), gauge.newest.load(Ordering::Relaxed))
            });
        let stale = gauges
            .clone()
            .filter(|&(_, len, newest)| len > 0 && self.is_stale(newest, now))
            .min_by_key(|&(_, _, newest)| newest)
            .map(|(other, _, _)| Victim { index: other, stale: true });
        own.victim = stale.or_else(|| {
            gauges
                .max_by_key(|&(_, len, _)| len)
                .filter(|&(_, len, _)| len > own.events.len() + self.margin())
                .map(|(other, _, _)| Victim { index: other, stale: false })
        });
        own.victim
    }

    fn check_open(&self, operation: &'static str) -> Result<(), ProviderError> {
        // Acquire: pairs with the Release store in `close`.
        if self.closed.load(Ordering::Acquire) { Err(closed_error(NAME, operation)) } else { Ok(()) }
    }

    fn cleanup(&self, now: Timestamp, operation: &'static str) -> Result<usize, ProviderError> {
        let Some(max_age) = self.config.max_age else {
            return self.check_open(operation).map(|()| 0);
        };
        let cutoff = now.saturating_sub(max_age).unwrap_or(Timestamp::MIN);
        let mut removed = 0;
        for index in 0..self.shards.len() {
            let mut shard = self.shard(index, operation)?;
            let expired = shard.events.finished_before(cutoff, &self.marks[index]);
            // Dropped with the shard's lock released, as `store_batch` drops what it evicts.
            let gone: Vec<Arc<Event>> = expired.iter().filter_map(|&id| shard.events.remove(id)).collect();
            shard.expired += gone.len() as u64;
            self.release_room(gone.len());
            self.publish_gauge(index, &shard);
            removed += gone.len();
            drop(shard);
            drop(gone);
        }
        if removed > 0 {
            tracing::debug!(count = removed, %cutoff, "memory provider: expired finished events");
        }
        Ok(removed)
    }
}

/// Each shard with updates in a grouping by [`Shared::group_by_shard`], in increasing order, with
/// its updates' indices.
fn each_shard_in<'a>(order: &'a [u32], ends: &'a [u32; SHARDS]) -> impl Iterator<Item = (usize, &'a [u32])> {
    let mut start = 0;
    ends.iter().enumerate().filter_map(move |(index, &end)| {
        let mine = &order[start as usize..end as usize];
        start = end;
        (!mine.is_empty()).then_some((index, mine))
    })
}

impl Cleaner {
    fn start(shared: Weak<Shared>, interval: Duration) -> Option<Self> {
        let (stop, stopped) = flume::bounded::<()>(0);
        let spawned = thread::spawn_named("eventbroker-memory-cleanup".to_owned(), move || {
            // Wakes every `interval`, or at once when `stop` is dropped; never a bare sleep.
            while let Err(flume::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let Some(shared) = shared.upgrade() else { return };
                if shared.cleanup(Timestamp::now(), "cleanup").is_err() {
                    return; // Closed.
                }
            }
        });
        match spawned {
            Ok(thread) => Some(Self { stop, thread }),
            Err(error) => {
                tracing::warn!(%error, "memory provider: cannot start the cleanup thread; \
                    finished events expire only through cleanup_now");
                None
            }
        }
    }

    fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            tracing::error!("memory provider: the cleanup thread panicked");
        }
    }
}

/// Where the memory provider stored an event: the number its store took and its slot in its
/// shard, all that a status update of it needs to be written without the shard's lock (see
/// [`MemoryProvider::update_ticketed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreTicket {
    pub(crate) number: u64,
    pub(crate) slot: u32,
}

impl StoreTicket {
    /// No store: an update with it is written by its event's id.
    pub(crate) const NONE: Self = Self { number: 0, slot: u32::MAX };
}

impl MemoryProvider {
    /// [`EventSink::store_batch`], handing `ticket` the ticket of each of `events` in turn, as it
    /// is stored: status updates of an event written through
    /// [`MemoryProvider::update_ticketed`] with its ticket go straight to its mark.
    ///
    /// The broker stores each event it publishes through this, and carries the ticket to its
    /// worker with the event: the worker then writes the event's statuses without the shard's
    /// lock, on lines no publisher writes.
    pub(crate) fn store_numbered(
        &self,
        events: &[Arc<Event>],
        origin: Option<&str>,
        mut ticket: impl FnMut(StoreTicket),
    ) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("store_batch")?;
        let tailing = shared.hub.is_tailed();
        // Acquire: pairs with the Release store in `open_inbound`; a group that joined before this
        // store began sees its events.
        let logging = shared.bus_active.load(Ordering::Acquire);
        let mut fresh: Vec<&Arc<Event>> = Vec::new();
        let mut guard: Option<(usize, RwLockWriteGuard<'_, Shard>)> = None;
        // Evicted events (those somebody else holds, and those parking displaced: see `linger`)
        // are dropped with the shard's lock released: freeing one built on another thread can wait
        // for that thread's allocator lock, and the shard's other stores should not wait with it.
        // A batch lets go of them every `EVICTED_HELD`.
        let mut evicted: SmallVec<[Arc<Event>; 1]> = SmallVec::new();
        for event in events {
            let index = shared.shard_of(event.id);
            if guard.as_ref().is_none_or(|(held, _)| *held != index) {
                drop(guard.take()); // One shard lock at a time.
                guard = Some((index, shared.shard(index, "store_batch")?));
            }
            let Some((_, held)) = guard.as_mut() else { unreachable!("just locked") };
            let stored = held.events.upsert(event, &shared.next_seq, &shared.marks[index]);
            let number = stored.number;
            held.newest = number;
            // A slot beyond `u32` (a bound above four billion events) is written by id.
            ticket(match u32::try_from(stored.slot) {
                Ok(slot) if slot != u32::MAX => StoreTicket { number, slot },
                _ => StoreTicket::NONE,
            });
            if stored.new {
                held.published += 1;
                if tailing || logging {
                    fresh.push(event);
                }
                if !shared.take_room() {
                    shared.evict_for_store(index, held, number, &mut evicted);
                    held.events.prefetch_evictions();
                }
            } else {
                held.replaced += 1;
            }
            shared.publish_gauge(index, held);
            if evicted.len() >= EVICTED_HELD {
                drop(guard.take());
                evicted.clear();
            }
        }
        drop(guard);
        drop(evicted);
        if fresh.is_empty() {
            return Ok(());
        }
        if logging && shared.bus.lock().append(fresh.iter().copied(), origin) {
            shared.bell.ring();
        }
        if tailing {
            let mut delivery = shared.hub.begin_delivery();
            for event in fresh {
                delivery.send(event);
            }
        }
        Ok(())
    }

    /// [`EventSink::update_status_batch`] of updates each with the ticket of its event's store,
    /// from [`MemoryProvider::store_numbered`]: written to the event's mark, without its shard's
    /// lock, unless the event was stored again since, or evicted. An update whose event moved to
    /// another slot since (a `get`, or its shard's ring placed again), or with
    /// [`StoreTicket::NONE`], is written by its event's id, as `update_status_batch` writes it.
    pub(crate) fn update_ticketed(
        &self,
        updates: &[StatusUpdate],
        tickets: &[StoreTicket],
    ) -> Result<(), ProviderError> {
        debug_assert_eq!(updates.len(), tickets.len(), "a ticket for each update");
        let shared = &*self.shared;
        shared.check_open("update_status_batch")?;
        for (update, ticket) in updates.iter().zip(tickets) {
            let index = shared.shard_of(update.id);
            let marks = &shared.marks[index];
            if *ticket != StoreTicket::NONE && marks.write(ticket.slot as usize, ticket.number, update) {
                continue;
            }
            // Rare (an event whose store failed, or that moved): one shard's lock for it alone.
            // Relaxed: as in `update_status_batch`.
            let written_at = shared.next_seq.load(Ordering::Relaxed);
            let mut part = shared.shard(index, "update_status_batch")?;
            shared.claim_by_id(index, &mut part, update, |stored_at| {
                if *ticket == StoreTicket::NONE { stored_at < written_at } else { stored_at == ticket.number }
            });
        }
        Ok(())
    }
}

impl EventSink for MemoryProvider {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        self.store_numbered(events, origin, |_| {})
    }

    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("update_status_batch")?;
        if updates.is_empty() {
            return Ok(());
        }
        // Relaxed: a store that returned before this call took its number before it (the caller
        // saw the store done), which coherence of this one counter orders; a store that has not
        // returned yet is concurrent with the update, which may or may not apply to it.
        let written_at = shared.next_seq.load(Ordering::Relaxed);
        shared.update_by_id(updates, written_at, "update_status_batch")
    }

    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError> {
        let mut guard = self.shared.letters.write();
        if guard.closed {
            return Err(closed_error(NAME, "store_dead_letters"));
        }
        for letter in letters {
            guard.table.upsert(letter.clone(), self.shared.config.max_dead_letters);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ProviderError> {
        // Stores and status updates are applied before they return.
        self.shared.check_open("flush")
    }
}

impl EventStore for MemoryProvider {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        let shared = &*self.shared;
        let index = shared.shard_of(id);
        let mut part = shared.shard(index, "get")?;
        Ok(part.events.touch(id, &shared.next_seq, &shared.marks[index]))
    }

    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let shared = &*self.shared;
        let take = filter.offset.saturating_add(filter.limit.unwrap_or(usize::MAX));
        let mut found: Vec<_> = shared
            .each_shard("list", |index, shard| shard.events.list(filter, take, &shared.marks[index]))?
            .into_iter()
            .flatten()
            .collect();
        found.sort_unstable_by_key(|(key, _)| *key);
        Ok(found
            .into_iter()
            .skip(filter.offset)
            .take(filter.limit.unwrap_or(usize::MAX))
            .map(|(_, e)| e)
            .collect())
    }

    fn delete(&self, id: EventId) -> Result<bool, ProviderError> {
        let shared = &*self.shared;
        let index = shared.shard_of(id);
        let mut part = shared.shard(index, "delete")?;
        let removed = part.events.remove(id);
        if removed.is_some() {
            shared.release_room(1);
            shared.publish_gauge(index, &part);
        }
        drop(part); // The entry is dropped with the shard released.
        Ok(removed.is_some())
    }

    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<ReplayPage, ProviderError> {
        let shared = &*self.shared;
        // Shards are read one after another while stores go on, and a store into a shard read
        // already can take a lower number than one read later: a page holding the later one
        // would step over it for good. Every number below the counter read first belongs to a
        // store that has finished, or holds its shard's lock until it has (see `take_numbers`),
        // so the page stops there; what was stored since comes with the next page.
        let before = shared.next_seq.load(Ordering::Acquire);
        let mut found: Vec<_> = shared
            .each_shard("replay", |index, shard| {
                shard.events.replay(from, before, pattern, limit, &shared.marks[index])
            })?
            .into_iter()
            .flatten()
            .collect();
        found.sort_unstable_by_key(|(seq, _)| *seq);
        found.truncate(limit);
        let events = found.into_iter().map(|(seq, event)| StoredEvent { seq, event }).collect();
        Ok(ReplayPage::from_events(events, limit))
    }

    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError> {
        let letters = self.shared.letters.read();
        if letters.closed {
            return Err(closed_error(NAME, "list_dead_letters"));
        }
        Ok(letters.table.list(filter))
    }

    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError> {
        let letters = self.shared.letters.read();
        if letters.closed {
            return Err(closed_error(NAME, "get_dead_letter"));
        }
        Ok(letters.table.get(id).cloned())
    }

    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError> {
        let mut letters = self.shared.letters.write();
        if letters.closed {
            return Err(closed_error(NAME, "delete_dead_letter"));
        }
        Ok(letters.table.remove(id).is_some())
    }

    fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let shared = &*self.shared;
        let mut stats = ProviderStats::new(NAME);
        let (mut evicted, mut expired, mut replaced) = (0_u64, 0_u64, 0_u64);
        shared.each_shard("stats", |index, shard| {
            let events = &shard.events;
            let counts = events.counts(&shared.marks[index]);
            let count = |status| counts[status_index(status)];
            stats.total_events += events.len() as u64;
            stats.pending_events += count(EventStatus::Pending);
            stats.processing_events += count(EventStatus::Processing);
            stats.completed_events += count(EventStatus::Completed);
            stats.failed_events += count(EventStatus::Failed);
            stats.events_published += shard.published;
            evicted += shard.evicted;
            expired += shard.expired;
            replaced += shard.replaced;
        })?;
        let letters = shared.letters.read();
        if letters.closed {
            return Err(closed_error(NAME, "stats"));
        }
        let bus = shared.bus.lock();
        let hub = &shared.hub;
        stats.events_consumed = hub.delivered() + bus.handed_out;
        stats.active_subscribers = (hub.active() + bus.open_sources()) as u64;
        stats.dead_letters = letters.table.len() as u64;
        stats.provider_specific = BTreeMap::from([
            ("max_events".to_owned(), shared.config.max_events.into()),
            ("shards".to_owned(), shared.shards.len().into()),
            ("evicted".to_owned(), evicted.into()),
            ("expired".to_owned(), expired.into()),
            ("replaced".to_owned(), replaced.into()),
            ("dead_letters_dropped".to_owned(), letters.table.dropped.into()),
            ("streams_missed".to_owned(), hub.missed().into()),
            ("bus_pending".to_owned(), bus.pending().into()),
            ("bus_logged".to_owned(), bus.logged().into()),
            ("bus_redelivered".to_owned(), bus.redelivered.into()),
            ("bus_echoes_skipped".to_owned(), bus.echoes_skipped.into()),
            ("bus_filtered".to_owned(), bus.filtered.into()),
            ("bus_lost".to_owned(), bus.lost.into()),
        ]);
        Ok(stats)
    }
}

impl Provider for MemoryProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            inbound: true,
            work_queue: true,
            filter_at_source: true,
            list: true,
            delete: true,
            replay: true,
            durable: false,
            inline_writes: true,
        }
    }

    fn open_inbound(&self, config: &InboundConfig) -> Result<Arc<dyn Inbound>, ProviderError> {
        let shared = &*self.shared;
        let mut bus = shared.bus.lock();
        shared.check_open("open_inbound")?;
        let source = bus.join(config, Instant::now());
        // Release: pairs with the Acquire load in `store_batch`.
        shared.bus_active.store(true, Ordering::Release);
        drop(bus);
        // Whatever a predecessor left may be due at once.
        shared.bell.ring();
        Ok(Arc::new(MemoryInbound {
            shared: Arc::clone(&self.shared),
            group: config.group().key(),
            source,
            closed: AtomicBool::new(false),
        }))
    }

    fn delete_group(&self, group: &ConsumerGroup) -> Result<bool, ProviderError> {
        self.shared.check_open("delete_group")?;
        self.shared.bus.lock().remove_group(&group.key()).map_err(|reason| {
            ProviderError::new(NAME, "delete_group", crate::error::ProviderErrorKind::InvalidInput(reason))
        })
    }

    fn close(&self) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        let mut released = Vec::with_capacity(shared.shards.len());
        for lock in &*shared.shards {
            let mut part = lock.write();
            part.closed = true;
            released.push((
                mem::replace(&mut part.events, EventTable::new(shared.ring_capacity)),
                mem::take(&mut part.lingering),
            ));
        }
        let letters = {
            let mut letters = shared.letters.write();
            letters.closed = true;
            mem::replace(&mut letters.table, LetterTable::new())
        };
        let bus = {
            let mut bus = shared.bus.lock();
            // Release: pairs with the Acquire loads in `check_open`; set under the bus lock so a
            // source opening now either is refused or sees a closed provider in every call.
            shared.closed.store(true, Ordering::Release);
            mem::replace(&mut *bus, Bus::new(0))
        };
        drop((released, letters, bus)); // Freed outside the locks.
        shared.hub.close();
        shared.bell.ring(); // Waiting fetchers find the provider closed.
        let cleaner = self.cleaner.lock().take();
        if let Some(cleaner) = cleaner {
            cleaner.stop();
        }
        Ok(())
    }
}

/// One broker's membership of a consumer group of the in-process bus.
///
/// Dropped without [`Inbound::close`], it is a broker that vanished: its unacknowledged events
/// stay owned until the claim idle time passes, as they would for a crashed process, and it is no
/// longer a member (the group can be deleted, and is not counted among the subscribers).
struct MemoryInbound {
    shared: Arc<Shared>,
    /// The group's key.
    group: String,
    source: SourceId,
    closed: AtomicBool,
}

impl MemoryInbound {
    /// The bus, unless this source or the provider is closed.
    fn bus(&self, operation: &'static str) -> Result<parking_lot::MutexGuard<'_, Bus>, ProviderError> {
        let bus = self.shared.bus.lock();
        // Relaxed: set under the bus lock, which orders it.
        if self.closed.load(Ordering::Relaxed) {
            return Err(closed_error(NAME, operation));
        }
        self.shared.check_open(operation)?;
        Ok(bus)
    }
}

impl Inbound for MemoryInbound {
    fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError> {
        let deadline = crate::deadline::from_now(wait);
        loop {
            let seen = self.shared.bell.count();
            let now = Instant::now();
            let fetched = self.bus("fetch")?.fetch(&self.group, self.source, max, now);
            if !fetched.events.is_empty() || max == 0 {
                return Ok(fetched
                    .events
                    .into_iter()
                    .map(|h| InboundEvent {
                        event: h.event,
                        token: AckToken::new(h.position),
                        deliveries: h.deliveries,
                    })
                    .collect());
            }
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = fetched.next_due.map_or(deadline, |due| due.min(deadline));
            self.shared.bell.wait(seen, until);
        }
    }

    fn ack(&self, acks: &[Ack]) -> Result<(), ProviderError> {
        self.bus("ack")?.ack(&self.group, acks.iter().map(|a| a.token));
        Ok(())
    }

    fn nak(&self, tokens: &[AckToken], delay: Duration) -> Result<(), ProviderError> {
        let due = crate::deadline::from_now(delay);
        self.bus("nak")?.nak(&self.group, self.source, tokens, due);
        self.shared.bell.ring();
        Ok(())
    }

    fn extend(&self, tokens: &[AckToken]) -> Result<(), ProviderError> {
        self.bus("extend")?.extend(&self.group, self.source, tokens, Instant::now());
        Ok(())
    }

    fn set_filter(&self, patterns: &[Pattern]) -> Result<(), ProviderError> {
        self.bus("set_filter")?.set_filter(&self.group, self.source, patterns);
        Ok(())
    }

    fn lost(&self) -> u64 {
        self.shared.bus.lock().lost_by(&self.group)
    }

    fn close(&self) -> Result<(), ProviderError> {
        let mut bus = self.shared.bus.lock();
        // Relaxed: see `bus`.
        if !self.closed.swap(true, Ordering::Relaxed) && !self.shared.closed.load(Ordering::Acquire) {
            bus.leave(&self.group, self.source, Instant::now());
            drop(bus);
            self.shared.bell.ring();
        }
        Ok(())
    }
}

impl Drop for MemoryInbound {
    fn drop(&mut self) {
        // Relaxed: see `bus`; `&mut self` is the only reference left.
        if !self.closed.load(Ordering::Relaxed) {
            self.shared.bus.lock().vanish(&self.group, self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use smallvec::SmallVec;

    use std::time::{Duration, Instant};

    use super::{MemoryConfig, MemoryProvider, SHARDED_FROM, StoreTicket, each_shard_in, linger};
    use crate::event::EventId;
    use crate::provider::StatusUpdate;
    use crate::{Event, EventSink, EventSource, EventStatus, EventStore, Provider};

    /// Every update comes once, in its own shard's run, the runs in increasing shard order and
    /// each in the order written; batches under and over the inline size, on one shard and on many.
    #[test]
    fn updates_grouped_by_shard_keep_their_order_within_each() {
        for max_events in [100, SHARDED_FROM, 100_000] {
            let provider = MemoryProvider::new(MemoryConfig { max_events, ..MemoryConfig::default() });
            let shared = &*provider.shared;
            for len in [0, 1, 7, 512, 513, 3_000] {
                let updates: Vec<StatusUpdate> =
                    (0..len).map(|_| StatusUpdate::new(EventId::new(), EventStatus::Completed)).collect();
                let mut order = SmallVec::new();
                let ends = shared.group_by_shard(&updates, &mut order);
                let mut seen = vec![false; len];
                let mut last_shard = None;
                for (index, mine) in each_shard_in(&order, &ends) {
                    assert!(last_shard < Some(index), "shards in increasing order, each once");
                    last_shard = Some(index);
                    assert!(mine.windows(2).all(|w| w[0] < w[1]), "written order within shard {index}");
                    for &at in mine {
                        assert_eq!(shared.shard_of(updates[at as usize].id), index);
                        assert!(!std::mem::replace(&mut seen[at as usize], true), "update {at} twice");
                    }
                }
                assert!(seen.iter().all(|&s| s), "every update grouped ({max_events}, {len})");
            }
        }
    }

    /// A store's ticket takes the updates of its event straight to its mark: they apply, in the
    /// order written, until the event is stored again or evicted; a late update with an old ticket
    /// changes neither the re-stored event nor the event that took over an evicted one's slot.
    /// Updates without a ticket are written by id, in the same call.
    #[test]
    fn ticketed_updates_apply_until_their_event_is_stored_again_or_evicted() {
        let provider = MemoryProvider::new(MemoryConfig { max_events: 2, ..MemoryConfig::default() });
        let status = |id| provider.get(id).unwrap().map(|e| (e.status, e.retry_count, e.error));
        let store = |event: &Arc<Event>| {
            let mut tickets = Vec::new();
            provider.store_numbered(std::slice::from_ref(event), None, |t| tickets.push(t)).unwrap();
            assert_eq!(tickets.len(), 1, "a ticket for each event");
            tickets[0]
        };
        let events: Vec<Arc<Event>> =
            (0..3).map(|_| Arc::new(Event::new(EventSource::System, "ticket.x"))).collect();
        let (a, b) = (store(&events[0]), store(&events[1]));
        assert!(a.number < b.number && a != StoreTicket::NONE);
        let update = |id, status: EventStatus, retries: u32| StatusUpdate {
            retry_count: retries,
            ..StatusUpdate::new(id, status)
        };
        provider
            .update_ticketed(
                &[
                    update(events[0].id, EventStatus::Processing, 0),
                    update(events[1].id, EventStatus::Processing, 0),
                    update(events[0].id, EventStatus::Failed, 2).with_error("no"),
                ],
                &[a, b, a],
            )
            .unwrap();
        assert_eq!(status(events[0].id), Some((EventStatus::Failed, 2, "no".to_owned())));
        assert_eq!(status(events[1].id), Some((EventStatus::Processing, 0, String::new())));

        // Stored again: the old ticket no longer applies; the new one does.
        let again = Arc::new(Event { id: events[0].id, ..Event::new(EventSource::System, "ticket.y") });
        let restored = store(&again);
        assert_eq!(status(events[0].id), Some((EventStatus::Pending, 0, String::new())), "as stored again");
        provider.update_ticketed(&[update(events[0].id, EventStatus::Completed, 0)], &[a]).unwrap();
        assert_eq!(status(events[0].id).unwrap().0, EventStatus::Pending, "written for the earlier store");
        provider.update_ticketed(&[update(events[0].id, EventStatus::Completed, 0)], &[restored]).unwrap();
        assert_eq!(status(events[0].id).unwrap().0, EventStatus::Completed);

        // `events[1]` is now the least recently used: the third event evicts it, and a later one
        // takes its slot.
        store(&events[2]);
        assert_eq!(status(events[1].id), None, "evicted");
        let (fourth, d) = (0..64)
            .map(|_| {
                let event = Arc::new(Event::new(EventSource::System, "ticket.z"));
                let ticket = store(&event);
                (event, ticket)
            })
            .find(|(_, ticket)| ticket.slot == b.slot)
            .expect("the ring comes round to the slot");
        provider.update_ticketed(&[update(events[1].id, EventStatus::Failed, 9)], &[b]).unwrap();
        assert_eq!(status(fourth.id), Some((EventStatus::Pending, 0, String::new())), "a late update");

        // Without a ticket: by id, beside ticketed ones, in the order written.
        provider
            .update_ticketed(
                &[
                    update(fourth.id, EventStatus::Failed, 1),
                    update(events[1].id, EventStatus::Failed, 3),
                    update(fourth.id, EventStatus::Processing, 2),
                ],
                &[StoreTicket::NONE, StoreTicket::NONE, d],
            )
            .unwrap();
        assert_eq!(status(fourth.id), Some((EventStatus::Processing, 2, String::new())));
        assert_eq!(status(events[1].id), None, "gone, whichever way it is written");
        let held = provider.stats().unwrap();
        // The fourth event, and the one stored before it.
        assert_eq!((held.pending_events, held.processing_events, held.total_events), (1, 1, 2));
    }

    /// Evicted events only the provider held are parked, a few per shard at most, without a
    /// change to the bound or the counts, and let go of when the provider closes; events somebody
    /// else holds are never parked. One shard and many, one event per store.
    #[test]
    fn evicted_events_nobody_holds_linger_a_few_per_shard() {
        for max_events in [100, SHARDED_FROM] {
            let provider = MemoryProvider::new(MemoryConfig { max_events, ..MemoryConfig::default() });
            let parked = |provider: &MemoryProvider| -> Vec<usize> {
                provider.shared.shards.iter().map(|shard| shard.read().lingering.len()).collect()
            };
            // Held by this test too: never parked.
            let kept: Vec<Arc<Event>> =
                (0..2 * max_events).map(|_| Arc::new(Event::new(EventSource::System, "a.x"))).collect();
            for e in &kept {
                provider.store_batch(std::slice::from_ref(e), None).expect("store");
            }
            assert!(parked(&provider).iter().all(|&n| n == 0), "{max_events}: nothing parked");
            for _ in 0..3 * max_events {
                let e = Arc::new(Event::new(EventSource::System, "a.x"));
                provider.store_batch(&[e], None).expect("store");
            }
            let counts = parked(&provider);
            assert!(counts.iter().all(|&n| n <= linger::SLOTS), "{max_events}: {counts:?}");
            assert!(counts.iter().sum::<usize>() > 0, "{max_events}: what the provider alone held is parked");
            assert!(
                kept.iter().all(|e| Arc::strong_count(e) == 1),
                "{max_events}: every kept event released"
            );
            let stats = provider.stats().expect("stats");
            assert_eq!(stats.total_events, max_events as u64);
            assert_eq!(stats.provider_specific["evicted"], 4 * max_events as u64);
            provider.close().expect("close");
            assert!(parked(&provider).iter().all(|&n| n == 0), "{max_events}: let go of on close");
        }
    }

    /// Statuses written with tickets, on another thread, while a third reads events back (each
    /// read moving its event to the head of its shard's ring, which fills with holes and is placed
    /// again): every status lands on its event, wherever the event is by then. One shard and many;
    /// bounded in events and time.
    #[test]
    fn ticketed_statuses_follow_events_that_reads_move() {
        for max_events in [1_000, SHARDED_FROM] {
            let provider =
                Arc::new(MemoryProvider::new(MemoryConfig { max_events, ..MemoryConfig::default() }));
            let (to_worker, worker_gets) = flume::bounded::<(EventId, StoreTicket)>(256);
            let stored_ids = Arc::new(parking_lot::Mutex::new(Vec::new()));
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let worker = {
                let provider = Arc::clone(&provider);
                std::thread::spawn(move || {
                    for (id, ticket) in worker_gets {
                        let updates = [
                            StatusUpdate::new(id, EventStatus::Processing),
                            StatusUpdate::new(id, EventStatus::Completed),
                        ];
                        provider.update_ticketed(&updates[..1], &[ticket]).unwrap();
                        provider.update_ticketed(&updates[1..], &[ticket]).unwrap();
                    }
                })
            };
            let reader = {
                let (provider, stored_ids, done) =
                    (Arc::clone(&provider), Arc::clone(&stored_ids), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut reads = 0_u64;
                    let mut pick: usize = 0x9E37_79B9;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        let id = {
                            let ids = stored_ids.lock();
                            if ids.is_empty() {
                                continue;
                            }
                            pick = pick.rotate_left(13).wrapping_mul(0x2545_F491);
                            // One of the latest `max_events`: mostly still held.
                            let recent = ids.len().min(max_events);
                            ids[ids.len() - 1 - pick % recent]
                        };
                        provider.get(id).unwrap();
                        reads += 1;
                    }
                    reads
                })
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut events = 0;
            while events < 30_000 && Instant::now() < deadline {
                let event = Arc::new(Event::new(EventSource::System, "follow.x"));
                let mut ticket = StoreTicket::NONE;
                provider.store_numbered(std::slice::from_ref(&event), None, |t| ticket = t).unwrap();
                stored_ids.lock().push(event.id);
                to_worker.send((event.id, ticket)).unwrap();
                events += 1;
            }
            drop(to_worker);
            worker.join().unwrap();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let reads = reader.join().unwrap();
            assert!(reads > 100, "{max_events}: the reader moved events ({reads} reads)");
            let mut held = 0;
            for &id in stored_ids.lock().iter() {
                if let Some(event) = provider.get(id).unwrap() {
                    assert_eq!(event.status, EventStatus::Completed, "{max_events}: event {id:?}");
                    held += 1;
                }
            }
            assert_eq!(held, max_events, "{max_events}: the bound is held");
            let stats = provider.stats().unwrap();
            assert_eq!((stats.completed_events, stats.total_events), (max_events as u64, max_events as u64));
        }
    }

    /// A bound as large as there is allocates nothing ahead for it (a configured `max_events` is
    /// any number): the provider is made at once, and stores, ticketed and by-id status writes,
    /// reads and stats work as at any bound.
    #[test]
    fn the_largest_bound_allocates_nothing_ahead() {
        let provider =
            MemoryProvider::new(MemoryConfig { max_events: usize::MAX, ..MemoryConfig::default() });
        let events: Vec<Arc<Event>> =
            (0..5_000).map(|_| Arc::new(Event::new(EventSource::System, "bound.x"))).collect();
        let mut tickets = Vec::new();
        provider.store_numbered(&events, None, |t| tickets.push(t)).unwrap();
        let (ticketed, by_id) = events.split_at(2_500);
        let processing: Vec<StatusUpdate> =
            ticketed.iter().map(|e| StatusUpdate::new(e.id, EventStatus::Processing)).collect();
        provider.update_ticketed(&processing, &tickets[..2_500]).unwrap();
        let completed: Vec<StatusUpdate> =
            by_id.iter().map(|e| StatusUpdate::new(e.id, EventStatus::Completed)).collect();
        provider.update_status_batch(&completed).unwrap();
        assert_eq!(provider.get(ticketed[7].id).unwrap().map(|e| e.status), Some(EventStatus::Processing));
        assert_eq!(provider.get(by_id[7].id).unwrap().map(|e| e.status), Some(EventStatus::Completed));
        let stats = provider.stats().unwrap();
        assert_eq!(
            (stats.total_events, stats.processing_events, stats.completed_events),
            (5_000, 2_500, 2_500)
        );
    }
}
