//! The in-process provider: bounded, least-recently-used eviction, expiry of finished events.
//!
//! Nothing survives [`Provider::close`] or the process; use it for development, tests and
//! single-instance deployments. Stores, reads and stats cost:
//!
//! | operation | cost |
//! |---|---|
//! | `store_batch` | O(1) per event: a hash insert, a recency-list push, a sequence-index append |
//! | `update_status_batch` | O(1) per update: the status fields are kept beside the event, never a copy of it |
//! | a broker's status writes | O(1) per update, without the shard's lock: see below |
//! | `get`, `delete` | O(1) (`delete`: O(log n) to mark its sequence number gone) |
//! | `list` | O(n) scan of the stored events, then a sort of the matches |
//! | `replay` | O(log n + events scanned from the start sequence); `Time` scans from the beginning |
//! | `stats` | O(shards): counters are kept on every change (per status: striped by thread) |
//!
//! The events are split into shards (16 of them from 4 096 events up, one below), each with its own
//! lock, by the lane in the lowest 4 bits of their id: the ids this crate makes name the thread that
//! made them (threads take the 16 lanes in turn), so the events one publisher makes go to one shard
//! and two publishers rarely meet on a lock; other ids spread at random. One thread's stores then
//! evict in the order it stored, which keeps the memory they touch in step. The provider is cheap
//! enough to be written inline by the threads that publish and handle events
//! ([`Capabilities::inline_writes`]), without a writer thread in between.
//!
//! A broker writing to it inline goes further: each event's status lives in a cell of its own
//! beside the shard, at a fixed address, which the store hands back to the broker with the event's
//! slot. The broker's workers then write `processing` and `completed` into the cell with a few
//! atomic stores, taking neither the shard's lock nor a lookup by id, so they never meet the
//! publishers storing into the same shard. A slot that has since been given to another event is
//! recognised by its generation and the late write dropped, as an update of an id no longer stored
//! is. An update with an error text (a failed event) takes the shard's lock as before.
//!
//! ## Bounds
//! - At most [`MemoryConfig::max_events`] events (10 000 by default), exactly once the stores in
//!   progress have returned, whichever shards they are in: one publisher alone fills the whole
//!   bound. Storing one more evicts the least recently used event: of all events, below 4 096;
//!   above, the storing shard's own unless another shard's is older by more than a sixteenth of the
//!   bound, so one quiet publisher's events still leave when they are the oldest. Storing and `get`
//!   count as use; status updates, `list`, `replay` and `stats` do not (in the broker's flow, events
//!   leave in the order they were stored unless read). Eviction ignores status, so an
//!   event still pending can be evicted; size the bound above the number of events in flight.
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
//! entries: a group that falls further behind loses the oldest, counted as `bus_lost`. Hand-outs,
//! redeliveries, skipped echoes and filtered events are counted as `bus_redelivered`,
//! `bus_echoes_skipped` and `bus_filtered`, next to `bus_pending` and `bus_logged`. Without groups
//! (a broker alone with its own provider) nothing of the bus costs anything.

use std::collections::BTreeMap;
use std::mem;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use jiff::Timestamp;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};

use self::bus::{Bell, Bus, SourceId};
#[cfg(eventbroker_loom)]
#[doc(hidden)]
pub use self::cells::CellModel;
pub(crate) use self::cells::StatusSlot;
use self::cells::{Cells, Moves, StatusCounts, Updated};
use self::letters::LetterTable;
use self::table::EventTable;
use super::{
    Ack, AckToken, Capabilities, DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter, EventSink,
    EventStore, EventStream, Inbound, InboundConfig, InboundEvent, Provider, ProviderStats, ReplayFrom,
    StatusUpdate, StoredEvent, StreamHub, closed_error,
};
use crate::error::ProviderError;
use crate::event::{Event, EventId, EventStatus};
use crate::pattern::Pattern;
use crate::sync::thread;

mod bus;
mod cells;
mod letters;
mod lru;
mod table;

const NAME: &str = "memory";

/// Shards of a provider holding at least [`SHARDED_FROM`] events.
const SHARDS: usize = 16;
/// Below this bound, one shard: least-recently-used eviction is then exact over every event.
const SHARDED_FROM: usize = 4096;
/// How many evictions a shard makes before it looks at the other shards' oldest events again.
const RESCAN_EVERY: u32 = 64;

/// Settings of a [`MemoryProvider`].
///
/// ```
/// use std::time::Duration;
/// use eventbroker::MemoryConfig;
///
/// let config = MemoryConfig { max_events: 100_000, max_age: Some(Duration::from_secs(3600)), ..MemoryConfig::default() };
/// assert_eq!(config.cleanup_interval, Some(Duration::from_secs(60)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Most events kept; storing more evicts the least recently used. Default 10 000. With 0 an
    /// event is evicted as soon as it is stored (streams and consumer groups still receive it).
    pub max_events: usize,
    /// Completed and failed events created longer ago than this are removed by cleanup. Default
    /// 24 hours; `None` keeps them until evicted.
    pub max_age: Option<Duration>,
    /// How often the background cleanup runs. Default 1 minute; `None` runs no background thread
    /// (call [`MemoryProvider::cleanup_now`] instead).
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
/// index work itself; dead letters and the bus have locks of their own; events are copied out and
/// streams fed after the locks are released. `close` (also run on drop) stops the cleanup thread
/// and joins it; it never waits longer than one cleanup pass.
pub struct MemoryProvider {
    shared: Arc<Shared>,
    cleaner: Mutex<Option<Cleaner>>,
}

struct Shared {
    config: MemoryConfig,
    shards: Box<[CachePadded<Part>]>,
    /// Each shard's status cells, which status updates through a [`StatusSlot`] write without the
    /// shard's lock. Apart from the shards: workers read it, and nobody writes it.
    cells: Box<[Arc<Cells>]>,
    /// Stored events per status, kept by whoever changes one.
    counts: Arc<StatusCounts>,
    letters: RwLock<Letters>,
    bus: Mutex<Bus>,
    /// Whether any consumer group exists: read on every store, without the bus's lock. Once true,
    /// always true (groups are durable).
    bus_active: AtomicBool,
    /// The provider's clock starts here: nanoseconds since are the stamps of each use of an event
    /// (stored, read), and the high bits of sequence numbers.
    started: Instant,
    /// No sequence number handed out from now on is at or below this one: raised by `replay` to
    /// the highest it returned, so paging on from there includes every later-stored event.
    floor: AtomicU64,
    /// Events stored, across shards: never above `max_events` once stores have returned.
    total: AtomicUsize,
    /// Set by `close`, after every shard and the letters are closed under their locks.
    closed: AtomicBool,
    hub: StreamHub,
    /// Rung when events that some consumer group may want are stored.
    bell: Bell,
}

/// One shard: its events behind its lock. Padded to cache lines of its own: in the broker's flow
/// one publisher writes it, and a neighbour's writes must not move its lock's line.
struct Part {
    lock: RwLock<Shard>,
    /// When the shard's least recently used event was last used (`u64::MAX` when it is empty):
    /// written under the lock, read without it by stores choosing what to evict.
    oldest: AtomicU64,
}

struct Shard {
    closed: bool,
    events: EventTable,
    /// The clock reading in this shard's last sequence number: each new one is later.
    last_tick: u64,
    /// The oldest `oldest` of the other shards when last looked at (it only grows, but for a
    /// shard that was empty), and how many evictions until the next look.
    others_oldest: u64,
    until_rescan: u32,
    published: u64,
    replaced: u64,
    evicted: u64,
    expired: u64,
}

struct Letters {
    closed: bool,
    table: LetterTable,
}

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
        let interval = config.cleanup_interval.filter(|_| config.max_age.is_some());
        let count = if config.max_events < SHARDED_FROM { 1 } else { SHARDS };
        let counts = Arc::new(StatusCounts::new());
        let cells: Box<[Arc<Cells>]> = (0..count).map(|_| Arc::new(Cells::new())).collect();
        let shards = cells
            .iter()
            .map(|cells| {
                let lock = RwLock::new(Shard {
                    closed: false,
                    events: EventTable::new(Arc::clone(cells), Arc::clone(&counts)),
                    last_tick: 0,
                    others_oldest: u64::MAX,
                    until_rescan: 0,
                    published: 0,
                    replaced: 0,
                    evicted: 0,
                    expired: 0,
                });
                CachePadded::new(Part { lock, oldest: AtomicU64::new(u64::MAX) })
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            cells,
            counts,
            letters: RwLock::new(Letters { closed: false, table: LetterTable::new() }),
            bus: Mutex::new(Bus::new(config.max_events)),
            bus_active: AtomicBool::new(false),
            started: Instant::now(),
            floor: AtomicU64::new(0),
            total: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
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
        let events: usize = self.shared.shards.iter().map(|s| s.lock.read().events.len()).sum();
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
    /// The shard an event id lives in: its lane, which for the ids this crate makes is the thread
    /// that made it (see [`crate::id::lane_of`]), and random for others.
    fn shard_of(&self, id: EventId) -> usize {
        crate::id::lane_of(id.as_uuid()) % self.shards.len()
    }

    /// Publishes when shard `index`'s least recently used event was last used, for other stores
    /// choosing what to evict.
    fn publish_oldest(&self, index: usize, held: &Shard) {
        // Relaxed: a hint; the evicting store checks under the shard's lock what it evicts.
        self.shards[index].oldest.store(held.events.oldest().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Takes room for one more event; `false` when the provider is full, and an event must go.
    fn take_room(&self) -> bool {
        // Relaxed: a count; the events themselves are published by the shard locks. When full,
        // nothing is written, so stores that also evict share the line without moving it.
        let max = self.config.max_events;
        self.total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// The provider's clock: nanoseconds since it started (2^60 of them last 36 years).
    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX).min(u64::MAX >> 4)
    }

    /// The next sequence number of shard `index`, at `now`: the clock reading, made later than
    /// the shard's last and than the floor, above the shard's index in the low 4 bits. Unique
    /// across shards and increasing within each, in store order across shards to the clock's
    /// precision, with no counter that every store writes.
    fn next_seq(&self, index: usize, last_tick: &mut u64, now: u64) -> u64 {
        // Relaxed: `replay` raises the floor before it returns its page; a store that begins
        // after that reads the raised value (the cache line is coherent), and nothing else is
        // published through it.
        let floor = self.floor.load(Ordering::Relaxed) >> 4;
        *last_tick = now.max(*last_tick + 1).max(floor + 1);
        (*last_tick << 4) | index as u64
    }

    /// Whether a store into shard `index` at `now`, with the provider full, evicts that shard's
    /// least recently used event rather than another shard's: it does unless another's is older
    /// by more than a sixteenth of the age of the storing shard's, or the storing shard holds
    /// nothing but the event just stored.
    fn evicts_here(&self, index: usize, held: &mut Shard, now: u64) -> bool {
        if self.shards.len() == 1 {
            return true;
        }
        if held.until_rescan == 0 {
            held.others_oldest = self.oldest_except(index).map_or(u64::MAX, |(_, oldest)| oldest);
            held.until_rescan = RESCAN_EVERY;
        } else {
            held.until_rescan -= 1;
        }
        let own = held.events.oldest().unwrap_or(u64::MAX);
        let slack = now.saturating_sub(own) / 16;
        held.others_oldest == u64::MAX
            || (held.events.len() > 1 && own <= held.others_oldest.saturating_add(slack))
    }

    /// The shard other than `except` whose least recently used event is oldest, with its stamp.
    fn oldest_except(&self, except: usize) -> Option<(usize, u64)> {
        self.shards
            .iter()
            .enumerate()
            .filter(|&(index, _)| index != except)
            // Relaxed: see `publish_oldest`.
            .map(|(index, part)| (index, part.oldest.load(Ordering::Relaxed)))
            .filter(|&(_, oldest)| oldest != u64::MAX)
            .min_by_key(|&(_, oldest)| oldest)
    }

    /// Evicts the least recently used event of the shard whose one is oldest: for a full store
    /// that chose not to evict from its own shard. Called without any shard lock held.
    fn evict_oldest(&self) {
        for _ in 0..self.shards.len() {
            let Some((index, _)) = self.oldest_except(usize::MAX) else { break };
            let Ok(mut held) = self.shard(index, "store_batch") else { return };
            let evicted = held.events.evict_least_recent();
            self.publish_oldest(index, &held);
            if evicted {
                held.evicted += 1;
                return;
            }
        }
        // Events were deleted meanwhile: the store's event takes the room they left.
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn shard(
        &self,
        index: usize,
        operation: &'static str,
    ) -> Result<RwLockWriteGuard<'_, Shard>, ProviderError> {
        let shard = self.shards[index].lock.write();
        if shard.closed { Err(closed_error(NAME, operation)) } else { Ok(shard) }
    }

    /// Runs `f` on each shard under its read lock, unless closed.
    fn each_shard<T>(
        &self,
        operation: &'static str,
        mut f: impl FnMut(&Shard) -> T,
    ) -> Result<Vec<T>, ProviderError> {
        self.shards
            .iter()
            .map(|part| {
                let shard = part.lock.read();
                if shard.closed { Err(closed_error(NAME, operation)) } else { Ok(f(&shard)) }
            })
            .collect()
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
            let expired = shard.events.finished_before(cutoff);
            for &id in &expired {
                shard.events.remove(id);
            }
            shard.expired += expired.len() as u64;
            self.publish_oldest(index, &shard);
            self.total.fetch_sub(expired.len(), Ordering::Relaxed);
            removed += expired.len();
        }
        if removed > 0 {
            tracing::debug!(count = removed, %cutoff, "memory provider: expired finished events");
        }
        Ok(removed)
    }
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

impl MemoryProvider {
    /// [`EventSink::store_batch`], telling `stored` where each event's status lives (`None` for
    /// a slot beyond what a [`StatusSlot`] addresses), in slice order.
    pub(crate) fn store_slotted(
        &self,
        events: &[Arc<Event>],
        origin: Option<&str>,
        mut stored: impl FnMut(Option<StatusSlot>),
    ) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("store_batch")?;
        let tailing = shared.hub.is_tailed();
        // Acquire: pairs with the Release store in `open_inbound`; a group that joined before this
        // store began sees its events.
        let logging = shared.bus_active.load(Ordering::Acquire);
        let mut fresh: Vec<&Arc<Event>> = Vec::new();
        let mut guard: Option<(usize, RwLockWriteGuard<'_, Shard>)> = None;
        // Stores that found the provider full and leave another shard to evict from.
        let mut evict_elsewhere = 0;
        // Read once per call, and moved on past each sequence number taken, so a batch's events
        // number in slice order whichever shards they go to.
        let mut now = shared.now();
        let release = |guard: Option<(usize, RwLockWriteGuard<'_, Shard>)>| {
            if let Some((index, held)) = guard {
                shared.publish_oldest(index, &held);
            }
        };
        for event in events {
            let index = shared.shard_of(event.id);
            if guard.as_ref().is_none_or(|(held, _)| *held != index) {
                release(guard.take()); // One shard lock at a time.
                guard = Some((index, shared.shard(index, "store_batch")?));
            }
            let Some((_, held)) = guard.as_mut() else { unreachable!("just locked") };
            let held: &mut Shard = held; // Its fields borrowed apart below.
            let last_tick = &mut held.last_tick;
            let placed = held.events.upsert(event, now, || shared.next_seq(index, last_tick, now));
            now = now.max(held.last_tick + 1);
            if placed.new {
                held.published += 1;
                if tailing || logging {
                    fresh.push(event);
                }
                if !shared.take_room() {
                    if shared.evicts_here(index, held, now) {
                        held.events.evict_least_recent();
                        held.evicted += 1;
                    } else {
                        evict_elsewhere += 1;
                    }
                }
            } else {
                held.replaced += 1;
            }
            let slot = u32::try_from(placed.slot).ok().map(|slot| StatusSlot {
                shard: u32::try_from(index).expect("fewer than 2^32 shards"),
                slot,
                generation: placed.generation,
            });
            stored(slot);
        }
        release(guard);
        for _ in 0..evict_elsewhere {
            shared.evict_oldest();
        }
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

    /// [`EventSink::update_status_batch`] through the slots [`store_slotted`](Self::store_slotted)
    /// gave: no shard lock and no lookup by id, unless an update carries an error text. An update
    /// of an event no longer stored changes nothing.
    pub(crate) fn update_slotted(&self, updates: &[(StatusSlot, StatusUpdate)]) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("update_status_batch")?;
        let mut moves = Moves::default();
        let mut result = Ok(());
        for (at, update) in updates {
            let slot = at.slot as usize;
            match shared.cells[at.shard as usize].get(slot).update(at.generation, update) {
                Updated::Done { from } => moves.moved(from, update.status),
                Updated::Gone => {}
                Updated::NeedsEntry => match shared.shard(at.shard as usize, "update_status_batch") {
                    Ok(mut held) => held.events.update_slot(slot, Some(at.generation), update),
                    Err(error) => {
                        result = Err(error);
                        break;
                    }
                },
            }
        }
        // Also when a shard closed midway: what was written is counted.
        shared.counts.apply(&moves);
        result
    }
}

impl EventSink for MemoryProvider {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        self.store_slotted(events, origin, |_| {})
    }

    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("update_status_batch")?;
        if shared.shards.len() == 1 || updates.len() < 2 {
            if let Some(first) = updates.first() {
                let mut held = shared.shard(shared.shard_of(first.id), "update_status_batch")?;
                for update in updates {
                    held.events.update(update);
                }
            }
            return Ok(());
        }
        // Each shard's lock once, its updates in slice order (a later update of an id wins: an id
        // is always in the same shard). A pass per shard over a byte per update is cheaper than
        // sorting them.
        let shard_of: smallvec::SmallVec<[u8; 256]> = updates
            .iter()
            .map(|u| u8::try_from(shared.shard_of(u.id)).expect("fewer than 256 shards"))
            .collect();
        let mut counts = [0usize; SHARDS];
        for &index in &shard_of {
            counts[usize::from(index)] += 1;
        }
        for (index, &count) in counts.iter().enumerate().filter(|&(_, &count)| count > 0) {
            let mut held = shared.shard(index, "update_status_batch")?;
            let in_shard = shard_of.iter().enumerate().filter(|&(_, &of)| usize::from(of) == index);
            for (i, _) in in_shard.take(count) {
                held.events.update(&updates[i]);
            }
        }
        Ok(())
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
        // Writes are applied before they return; there is nothing buffered to wait for.
        self.shared.check_open("flush")
    }
}

impl EventStore for MemoryProvider {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        let shared = &*self.shared;
        let index = shared.shard_of(id);
        let now = shared.now();
        let mut held = shared.shard(index, "get")?;
        let event = held.events.touch(id, now);
        shared.publish_oldest(index, &held);
        Ok(event)
    }

    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let take = filter.offset.saturating_add(filter.limit.unwrap_or(usize::MAX));
        let mut found: Vec<_> = self
            .shared
            .each_shard("list", |shard| shard.events.list(filter, take))?
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
        let mut held = shared.shard(index, "delete")?;
        let removed = held.events.remove(id).is_some();
        if removed {
            shared.publish_oldest(index, &held);
            shared.total.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ProviderError> {
        let mut found: Vec<_> = self
            .shared
            .each_shard("replay", |shard| shard.events.replay(from, pattern, limit))?
            .into_iter()
            .flatten()
            .collect();
        found.sort_unstable_by_key(|(seq, _)| *seq);
        found.truncate(limit);
        if let Some(&(last, _)) = found.last() {
            // Relaxed: see `next_seq`.
            self.shared.floor.fetch_max(last, Ordering::Relaxed);
        }
        Ok(found.into_iter().map(|(seq, event)| StoredEvent { seq, event }).collect())
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
        shared.each_shard("stats", |shard| {
            let events = &shard.events;
            stats.total_events += events.len() as u64;
            stats.events_published += shard.published;
            evicted += shard.evicted;
            expired += shard.expired;
            replaced += shard.replaced;
        })?;
        let counts = &shared.counts;
        stats.pending_events = counts.count(EventStatus::Pending);
        stats.processing_events = counts.count(EventStatus::Processing);
        stats.completed_events = counts.count(EventStatus::Completed);
        stats.failed_events = counts.count(EventStatus::Failed);
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

    fn close(&self) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        let mut released = Vec::with_capacity(shared.shards.len());
        for (part, cells) in shared.shards.iter().zip(&shared.cells) {
            let mut held = part.lock.write();
            held.closed = true;
            let empty = EventTable::new(Arc::clone(cells), Arc::clone(&shared.counts));
            released.push(mem::replace(&mut held.events, empty));
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
/// stay owned until the claim idle time passes, as they would for a crashed process.
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
        self.bus("nak")?.nak(&self.group, tokens, due);
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

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use std::sync::Arc;

    use jiff::Timestamp;

    use super::{MemoryConfig, MemoryProvider, StatusSlot};
    use crate::provider::{EventFilter, EventSink, EventStore, StatusUpdate};
    use crate::{Event, EventSource, EventStatus};

    fn provider(max_events: usize) -> MemoryProvider {
        MemoryProvider::new(MemoryConfig { max_events, cleanup_interval: None, ..MemoryConfig::default() })
    }

    fn store(provider: &MemoryProvider, event: &Arc<Event>) -> StatusSlot {
        let mut slot = None;
        provider.store_slotted(std::slice::from_ref(event), None, |s| slot = s).unwrap();
        slot.expect("a slot")
    }

    fn counts(provider: &MemoryProvider) -> [u64; 5] {
        let s = provider.stats().unwrap();
        [s.total_events, s.pending_events, s.processing_events, s.completed_events, s.failed_events]
    }

    #[test]
    fn a_slotted_update_of_an_evicted_event_changes_nothing() {
        let provider = provider(2);
        let [a, b, c, d] = ["a.x", "b.x", "c.x", "d.x"].map(|t| Arc::new(Event::new(EventSource::System, t)));
        let slot_a = store(&provider, &a);
        let slot_b = store(&provider, &b);
        let slot_c = store(&provider, &c); // Evicts `a`.
        let slot_d = store(&provider, &d); // Takes `a`'s slot, evicts `b`.
        assert_eq!((slot_d.shard, slot_d.slot), (slot_a.shard, slot_a.slot));
        let done =
            |e: &Event| StatusUpdate::new(e.id, EventStatus::Completed).with_completed_at(Timestamp::now());
        provider.update_slotted(&[(slot_a, done(&a)), (slot_b, done(&b)), (slot_c, done(&c))]).unwrap();
        assert!(provider.get(a.id).unwrap().is_none());
        assert_eq!(provider.get(c.id).unwrap().unwrap().status, EventStatus::Completed);
        assert_eq!(provider.get(d.id).unwrap().unwrap().status, EventStatus::Pending, "a's update missed d");
        assert_eq!(counts(&provider), [2, 1, 0, 1, 0]);
    }

    #[test]
    fn slotted_updates_carry_errors_retries_and_times_as_updates_by_id_do() {
        let provider = provider(10);
        let event = Arc::new(Event::new(EventSource::System, "job.run"));
        let slot = store(&provider, &event);
        let started = Timestamp::now();
        let processing = StatusUpdate::new(event.id, EventStatus::Processing).with_processed_at(started);
        let failed = StatusUpdate::new(event.id, EventStatus::Failed)
            .with_error("boom")
            .with_retry_count(3)
            .with_completed_at(Timestamp::now());
        provider.update_slotted(&[(slot, processing)]).unwrap();
        assert_eq!(counts(&provider), [1, 0, 1, 0, 0]);
        provider.update_slotted(&[(slot, failed.clone())]).unwrap();
        let stored = provider.get(event.id).unwrap().unwrap();
        let mut expected = Event::clone(&event);
        failed.apply_to(&mut expected);
        expected.processed_at = Some(started);
        assert_eq!(stored, expected);
        assert_eq!(provider.list(&EventFilter::new().with_status(EventStatus::Failed)).unwrap(), [expected]);
        // The error text moved the fields to the entry; later updates still land, by slot and by id.
        provider.update_slotted(&[(slot, StatusUpdate::new(event.id, EventStatus::Completed))]).unwrap();
        let stored = provider.get(event.id).unwrap().unwrap();
        assert_eq!(
            (stored.status, stored.error.as_str(), stored.processed_at),
            (EventStatus::Completed, "", Some(started))
        );
        provider.update_status_batch(&[StatusUpdate::new(event.id, EventStatus::Pending)]).unwrap();
        assert_eq!(counts(&provider), [1, 1, 0, 0, 0]);
    }

    #[test]
    fn a_re_store_keeps_the_slot_and_takes_the_new_status() {
        let provider = provider(10);
        let event = Arc::new(Event::new(EventSource::System, "job.run"));
        let slot = store(&provider, &event);
        provider.update_slotted(&[(slot, StatusUpdate::new(event.id, EventStatus::Processing))]).unwrap();
        let mut again = Event::clone(&event);
        again.status = EventStatus::Failed;
        again.error = "from elsewhere".into();
        assert_eq!(store(&provider, &Arc::new(again.clone())), slot);
        assert_eq!(provider.get(event.id).unwrap().unwrap(), again);
        assert_eq!(counts(&provider), [1, 0, 0, 0, 1]);
    }

    /// An event made on a thread of lane `lane`.
    fn in_lane(lane: u128) -> Arc<Event> {
        let mut event = Event::new(EventSource::System, "lane.x");
        event.id =
            crate::EventId::from_uuid(uuid::Uuid::from_u128((event.id.as_uuid().as_u128() & !0xF) | lane));
        Arc::new(event)
    }

    #[test]
    fn one_thread_fills_the_whole_bound_and_keeps_the_most_recent() {
        let provider = provider(10_000);
        let events: Vec<Arc<Event>> = (0..25_000).map(|_| in_lane(5)).collect();
        for event in &events {
            provider.store_batch(std::slice::from_ref(event), None).unwrap();
        }
        assert_eq!(counts(&provider), [10_000, 10_000, 0, 0, 0]);
        assert!(events[..15_000].iter().all(|e| provider.get(e.id).unwrap().is_none()));
        assert!(events[15_000..].iter().all(|e| provider.get(e.id).unwrap().is_some()));
        assert_eq!(provider.stats().unwrap().provider_specific["evicted"], 15_000);
    }

    #[test]
    fn a_quiet_lane_is_evicted_once_its_events_are_the_oldest() {
        let provider = provider(10_000);
        let quiet: Vec<Arc<Event>> = (0..100).map(|_| in_lane(1)).collect();
        provider.store_batch(&quiet, None).unwrap();
        let kept = in_lane(1);
        provider.store_batch(std::slice::from_ref(&kept), None).unwrap();
        for _ in 0..20_000 {
            provider.store_batch(&[in_lane(2)], None).unwrap();
            // Read now and then, `kept` stays among the most recently used.
            if fastrand::u8(..) == 0 {
                provider.get(kept.id).unwrap().expect("kept alive by use");
            }
        }
        assert!(
            quiet.iter().all(|e| provider.get(e.id).unwrap().is_none()),
            "the quiet lane's events went first"
        );
        assert!(provider.get(kept.id).unwrap().is_some());
        assert_eq!(counts(&provider)[0], 10_000);
    }

    #[test]
    fn concurrent_stores_in_many_lanes_end_at_exactly_the_bound() {
        let provider = Arc::new(provider(10_000));
        std::thread::scope(|s| {
            for lane in 0..4 {
                let provider = Arc::clone(&provider);
                s.spawn(move || {
                    for _ in 0..10_000 {
                        provider.store_batch(&[in_lane(lane)], None).unwrap();
                    }
                });
            }
        });
        assert_eq!(counts(&provider), [10_000, 10_000, 0, 0, 0]);
        assert_eq!(provider.list(&EventFilter::new()).unwrap().len(), 10_000);
        assert_eq!(provider.stats().unwrap().provider_specific["evicted"], 30_000);
        let deleted = provider.list(&EventFilter::new().with_limit(10)).unwrap();
        for event in &deleted {
            assert!(provider.delete(event.id).unwrap());
        }
        provider.store_batch(&(0..10).map(|_| in_lane(9)).collect::<Vec<_>>(), None).unwrap();
        assert_eq!(counts(&provider)[0], 10_000, "deleted room is taken before anything is evicted");
        assert_eq!(provider.stats().unwrap().provider_specific["evicted"], 30_000);
    }

    #[test]
    fn replay_follows_store_order_across_lanes_and_paging_misses_no_later_store() {
        use crate::provider::ReplayFrom;
        let provider = provider(10_000);
        let stored: Vec<Arc<Event>> = [3, 7, 3, 7, 12, 3].into_iter().map(in_lane).collect();
        for event in &stored {
            provider.store_batch(std::slice::from_ref(event), None).unwrap();
        }
        let ids = |page: &[crate::provider::StoredEvent]| page.iter().map(|s| s.event.id).collect::<Vec<_>>();
        let all = provider.replay(ReplayFrom::Beginning, None, 100).unwrap();
        assert_eq!(ids(&all), stored.iter().map(|e| e.id).collect::<Vec<_>>());
        let page = provider.replay(ReplayFrom::Beginning, None, 4).unwrap();
        let later: Vec<Arc<Event>> = [0, 15, 7].into_iter().map(in_lane).collect();
        provider.store_batch(&later, None).unwrap();
        let rest = provider.replay(ReplayFrom::Sequence(page[3].seq + 1), None, 100).unwrap();
        let expected: Vec<_> = stored[4..].iter().chain(&later).map(|e| e.id).collect();
        assert_eq!(ids(&rest), expected);
    }

    /// Publishers storing and workers updating through slots at once, with evictions: every event
    /// left ends completed, and the per-status counts add up to exactly what is stored.
    #[test]
    fn concurrent_stores_and_slotted_updates_keep_the_counts_exact() {
        const PER_THREAD: usize = 20_000;
        for max_events in [1_000, 100_000] {
            let provider = Arc::new(provider(max_events));
            let (tx, rx) = crossbeam_channel::bounded::<(StatusSlot, crate::EventId)>(256);
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let (provider, rx) = (Arc::clone(&provider), rx.clone());
                    std::thread::spawn(move || {
                        for (slot, id) in rx {
                            let now = Timestamp::now();
                            provider
                                .update_slotted(&[
                                    (
                                        slot,
                                        StatusUpdate::new(id, EventStatus::Processing).with_processed_at(now),
                                    ),
                                    (
                                        slot,
                                        StatusUpdate::new(id, EventStatus::Completed).with_completed_at(now),
                                    ),
                                ])
                                .unwrap();
                        }
                    })
                })
                .collect();
            drop(rx);
            let publishers: Vec<_> = (0..2)
                .map(|_| {
                    let (provider, tx) = (Arc::clone(&provider), tx.clone());
                    std::thread::spawn(move || {
                        for _ in 0..PER_THREAD {
                            let event = Arc::new(Event::new(EventSource::System, "load.x"));
                            let slot = store(&provider, &event);
                            tx.send((slot, event.id)).unwrap();
                        }
                    })
                })
                .collect();
            drop(tx);
            for thread in publishers.into_iter().chain(workers) {
                thread.join().unwrap();
            }
            let held = max_events.min(2 * PER_THREAD) as u64;
            assert_eq!(counts(&provider), [held, 0, 0, held, 0], "bound {max_events}");
            let listed = provider.list(&EventFilter::new()).unwrap();
            assert!(listed.iter().all(|e| e.status == EventStatus::Completed && e.completed_at.is_some()));
        }
    }
}
