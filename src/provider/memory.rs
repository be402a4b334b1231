//! The in-process provider: bounded, least-recently-used eviction, expiry of finished events.
//!
//! Nothing survives [`Provider::close`] or the process; use it for development, tests and
//! single-instance deployments. Stores, reads and stats cost:
//!
//! | operation | cost |
//! |---|---|
//! | `store_batch`, `update_status_batch` | O(log n) per event (time and sequence indexes), O(1) LRU |
//! | `get`, `delete` | O(log n) |
//! | `list` | O(log n + events scanned in the filter's time window) |
//! | `replay` | O(log n + events scanned from the start sequence); `Time` scans from the beginning |
//! | `stats` | O(1): counters are kept on every change |
//!
//! ## Bounds
//! - At most [`MemoryConfig::max_events`] events (10 000 by default). Storing one more evicts the
//!   least recently used: storing, `get` and status updates count as use; `list`, `replay` and
//!   `stats` do not. Eviction ignores status, so an event still pending can be evicted; size the
//!   bound above the number of events in flight.
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
//! [`InboundConfig::claim_idle`], filters applied before anything is handed out. Groups live as
//! long as the provider and read its sequence index, so a group that falls more than
//! [`MemoryConfig::max_events`] events behind loses the evicted ones (counted as `bus_lost` when
//! they were pending). Hand-outs, redeliveries, skipped echoes and filtered events are counted as
//! `bus_redelivered`, `bus_echoes_skipped`, `bus_filtered`, next to `bus_pending`.

use std::collections::{BTreeMap, HashMap};
use std::mem;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use uuid::Uuid;

use self::bus::{Bell, Bus, Log, SourceId};
use self::lru::Lru;
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
mod lru;

const NAME: &str = "memory";

/// Sorts before every real id at the same time, to start a range at a time.
const MIN_ID: EventId = EventId::from_uuid(Uuid::nil());

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
    /// event is evicted as soon as it is stored (streams still receive it).
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
/// Thread-safe: one read-write lock guards the events and dead letters, held only for the index
/// work itself; events are copied out and streams fed after it is released. `close` (also run on
/// drop) stops the cleanup thread and joins it; it never waits longer than one cleanup pass.
pub struct MemoryProvider {
    shared: Arc<Shared>,
    cleaner: Mutex<Option<Cleaner>>,
}

struct Shared {
    config: MemoryConfig,
    /// Lock order: `state`, then the hub's lock, never the other way round.
    state: RwLock<State>,
    hub: StreamHub,
    /// Rung when events that some consumer group may want are stored.
    bell: Bell,
}

struct State {
    closed: bool,
    events: EventTable,
    letters: LetterTable,
    bus: Bus,
    published: u64,
    replaced: u64,
    evicted: u64,
    expired: u64,
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
        let shared = Arc::new(Shared {
            state: RwLock::new(State {
                closed: false,
                events: EventTable::new(),
                letters: LetterTable::new(),
                bus: Bus::default(),
                published: 0,
                replaced: 0,
                evicted: 0,
                expired: 0,
            }),
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
        let state = self.shared.state.read();
        f.debug_struct("MemoryProvider")
            .field("config", &self.shared.config)
            .field("events", &state.events.len())
            .field("dead_letters", &state.letters.len())
            .field("closed", &state.closed)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn read(&self, operation: &'static str) -> Result<RwLockReadGuard<'_, State>, ProviderError> {
        let state = self.state.read();
        if state.closed { Err(closed_error(NAME, operation)) } else { Ok(state) }
    }

    fn write(&self, operation: &'static str) -> Result<RwLockWriteGuard<'_, State>, ProviderError> {
        let state = self.state.write();
        if state.closed { Err(closed_error(NAME, operation)) } else { Ok(state) }
    }

    fn cleanup(&self, now: Timestamp, operation: &'static str) -> Result<usize, ProviderError> {
        let Some(max_age) = self.config.max_age else {
            return self.read(operation).map(|_| 0);
        };
        let cutoff = now.saturating_sub(max_age).unwrap_or(Timestamp::MIN);
        let mut state = self.write(operation)?;
        let expired = state.events.finished_before(cutoff);
        for &id in &expired {
            state.events.remove(id);
        }
        state.expired += expired.len() as u64;
        drop(state);
        if !expired.is_empty() {
            tracing::debug!(count = expired.len(), %cutoff, "memory provider: expired finished events");
        }
        Ok(expired.len())
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

impl EventSink for MemoryProvider {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        let mut guard = self.shared.write("store_batch")?;
        // Taken while the store lock is held (the documented lock order), so deliveries happen in
        // store order even when stores run on several threads.
        let mut delivery = self.shared.hub.begin_delivery();
        let tailing = !delivery.is_idle();
        let state = &mut *guard;
        let origin: Option<Arc<str>> = origin.map(Arc::from);
        let mut fresh = Vec::new();
        let mut stored_new = false;
        for event in events {
            if state.events.upsert(event, origin.as_ref()) {
                state.published += 1;
                stored_new = true;
                if tailing {
                    fresh.push(event);
                }
            } else {
                state.replaced += 1;
            }
            while state.events.len() > self.shared.config.max_events {
                state.events.evict_least_recent();
                state.evicted += 1;
            }
        }
        let ring = stored_new && state.bus.interested(origin.as_deref());
        drop(guard); // Streams are fed, and fetchers woken, without the store lock.
        for event in fresh {
            delivery.send(event);
        }
        if ring {
            self.shared.bell.ring();
        }
        Ok(())
    }

    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        let mut state = self.shared.write("update_status_batch")?;
        for update in updates {
            state.events.update(update);
        }
        Ok(())
    }

    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError> {
        let mut state = self.shared.write("store_dead_letters")?;
        for letter in letters {
            state.letters.upsert(letter.clone(), self.shared.config.max_dead_letters);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ProviderError> {
        // Writes are applied before they return; there is nothing buffered to wait for.
        self.shared.read("flush").map(drop)
    }
}

impl EventStore for MemoryProvider {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        let found = self.shared.write("get")?.events.touch(id);
        Ok(found.map(|event| Event::clone(&event)))
    }

    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let page = self.shared.read("list")?.events.list(filter);
        Ok(page.iter().map(|event| Event::clone(event)).collect())
    }

    fn delete(&self, id: EventId) -> Result<bool, ProviderError> {
        Ok(self.shared.write("delete")?.events.remove(id).is_some())
    }

    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ProviderError> {
        let page = self.shared.read("replay")?.events.replay(from, pattern, limit);
        Ok(page.into_iter().map(|(seq, event)| StoredEvent { seq, event: Event::clone(&event) }).collect())
    }

    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError> {
        Ok(self.shared.read("list_dead_letters")?.letters.list(filter))
    }

    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError> {
        Ok(self.shared.read("get_dead_letter")?.letters.get(id).cloned())
    }

    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError> {
        Ok(self.shared.write("delete_dead_letter")?.letters.remove(id).is_some())
    }

    fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let state = self.shared.read("stats")?;
        let count = |status| state.events.count(status);
        let hub = &self.shared.hub;
        let bus = &state.bus;
        Ok(ProviderStats {
            provider_type: NAME.to_owned(),
            total_events: state.events.len() as u64,
            pending_events: count(EventStatus::Pending),
            processing_events: count(EventStatus::Processing),
            completed_events: count(EventStatus::Completed),
            failed_events: count(EventStatus::Failed),
            events_published: state.published,
            events_consumed: hub.delivered() + bus.handed_out,
            active_subscribers: (hub.active() + bus.open_sources()) as u64,
            dead_letters: state.letters.len() as u64,
            provider_specific: BTreeMap::from([
                ("max_events".to_owned(), self.shared.config.max_events.into()),
                ("evicted".to_owned(), state.evicted.into()),
                ("expired".to_owned(), state.expired.into()),
                ("replaced".to_owned(), state.replaced.into()),
                ("dead_letters_dropped".to_owned(), state.letters.dropped.into()),
                ("streams_missed".to_owned(), hub.missed().into()),
                ("bus_pending".to_owned(), bus.pending().into()),
                ("bus_redelivered".to_owned(), bus.redelivered.into()),
                ("bus_echoes_skipped".to_owned(), bus.echoes_skipped.into()),
                ("bus_filtered".to_owned(), bus.filtered.into()),
                ("bus_lost".to_owned(), bus.lost.into()),
            ]),
        })
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
        }
    }

    fn open_inbound(&self, config: &InboundConfig) -> Result<Arc<dyn Inbound>, ProviderError> {
        let mut guard = self.shared.write("open_inbound")?;
        let state = &mut *guard;
        let source = state.bus.join(config, &state.events, Instant::now());
        drop(guard);
        // Whatever a predecessor left may be due at once.
        self.shared.bell.ring();
        Ok(Arc::new(MemoryInbound {
            shared: Arc::clone(&self.shared),
            group: config.group().key(),
            source,
            closed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn close(&self) -> Result<(), ProviderError> {
        let released = {
            let mut state = self.shared.state.write();
            state.closed = true;
            (
                mem::replace(&mut state.events, EventTable::new()),
                mem::replace(&mut state.letters, LetterTable::new()),
                mem::take(&mut state.bus),
            )
        };
        drop(released); // Freed outside the lock.
        self.shared.hub.close();
        self.shared.bell.ring(); // Waiting fetchers find the provider closed.
        let cleaner = self.cleaner.lock().take();
        if let Some(cleaner) = cleaner {
            cleaner.stop();
        }
        Ok(())
    }
}

impl MemoryProvider {
    /// Opens a stream of the events stored through this provider from now on whose type matches
    /// `pattern`: local tailing, in store order. Events stored before the call are not delivered;
    /// use [`EventStore::replay`] for those. See [`EventStream`] for what happens when the stream
    /// is full. (Other brokers' events reach a broker through [`Provider::open_inbound`].)
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
        // Opened under the state lock, so `close` either ends this stream or refuses it.
        let state = self.shared.read("stream")?;
        let stream = self.shared.hub.open(pattern.clone());
        drop(state);
        Ok(stream)
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
    closed: std::sync::atomic::AtomicBool,
}

impl MemoryInbound {
    /// The state, for writing, unless this source or the provider is closed.
    fn state(&self, operation: &'static str) -> Result<RwLockWriteGuard<'_, State>, ProviderError> {
        // Relaxed: a flag read under (and set before) the state lock, which orders it.
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(closed_error(NAME, operation));
        }
        self.shared.write(operation)
    }
}

impl Inbound for MemoryInbound {
    fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError> {
        let started = Instant::now();
        let deadline = started.checked_add(wait).unwrap_or(started + Duration::from_secs(86_400));
        loop {
            let seen = self.shared.bell.count();
            let now = Instant::now();
            let mut guard = self.state("fetch")?;
            let state = &mut *guard;
            let fetched = state.bus.fetch(&self.group, self.source, max, &state.events, now);
            drop(guard);
            if !fetched.events.is_empty() || max == 0 {
                return Ok(fetched
                    .events
                    .into_iter()
                    .map(|h| InboundEvent {
                        event: h.event,
                        token: AckToken::new(h.seq),
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
        self.state("ack")?.bus.ack(&self.group, acks.iter().map(|a| a.token));
        Ok(())
    }

    fn nak(&self, tokens: &[AckToken], delay: Duration) -> Result<(), ProviderError> {
        let now = Instant::now();
        let due = now.checked_add(delay).unwrap_or(now + Duration::from_secs(86_400));
        self.state("nak")?.bus.nak(&self.group, tokens, due);
        self.shared.bell.ring();
        Ok(())
    }

    fn extend(&self, tokens: &[AckToken]) -> Result<(), ProviderError> {
        self.state("extend")?.bus.extend(&self.group, self.source, tokens, Instant::now());
        Ok(())
    }

    fn set_filter(&self, patterns: &[Pattern]) -> Result<(), ProviderError> {
        self.state("set_filter")?.bus.set_filter(&self.group, self.source, patterns);
        Ok(())
    }

    fn close(&self) -> Result<(), ProviderError> {
        let mut state = self.shared.state.write();
        // Relaxed: see `state`.
        if !self.closed.swap(true, std::sync::atomic::Ordering::Relaxed) && !state.closed {
            state.bus.leave(&self.group, self.source, Instant::now());
            drop(state);
            self.shared.bell.ring();
        }
        Ok(())
    }
}

/// One stored event and its sequence number.
struct Entry {
    event: Arc<Event>,
    seq: u64,
    /// The consumer group that published it, if a broker did.
    origin: Option<Arc<str>>,
}

/// The stored events: a recency list holding them, and indexes by id, by `(created_at, id)` (for
/// `list` and expiry) and by sequence (for `replay`), all pointing at recency-list slots.
struct EventTable {
    lru: Lru<Entry>,
    by_id: HashMap<EventId, usize, foldhash::fast::RandomState>,
    by_time: BTreeMap<(Timestamp, EventId), usize>,
    by_seq: BTreeMap<u64, usize>,
    /// Stored events per status, indexed by [`status_index`].
    by_status: [u64; 4],
    next_seq: u64,
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
    fn new() -> Self {
        Self {
            lru: Lru::new(),
            by_id: HashMap::default(),
            by_time: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            by_status: [0; 4],
            next_seq: 1,
        }
    }

    fn len(&self) -> usize {
        self.lru.len()
    }

    fn count(&self, status: EventStatus) -> u64 {
        self.by_status[status_index(status)]
    }

    /// Stores `event` as the most recently used; `true` when its id was not stored yet. A re-store
    /// keeps the first store's sequence number and origin.
    fn upsert(&mut self, event: &Arc<Event>, origin: Option<&Arc<str>>) -> bool {
        let id = event.id;
        if let Some(&slot) = self.by_id.get(&id) {
            let entry = self.lru.get_mut(slot);
            let old = mem::replace(&mut entry.event, Arc::clone(event));
            if old.created_at != event.created_at {
                self.by_time.remove(&(old.created_at, id));
                self.by_time.insert((event.created_at, id), slot);
            }
            self.by_status[status_index(old.status)] -= 1;
            self.by_status[status_index(event.status)] += 1;
            self.lru.touch(slot);
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = self.lru.push_front(Entry { event: Arc::clone(event), seq, origin: origin.cloned() });
        self.by_id.insert(id, slot);
        self.by_time.insert((event.created_at, id), slot);
        self.by_seq.insert(seq, slot);
        self.by_status[status_index(event.status)] += 1;
        true
    }

    /// The event with `id`, now the most recently used.
    fn touch(&mut self, id: EventId) -> Option<Arc<Event>> {
        let slot = *self.by_id.get(&id)?;
        self.lru.touch(slot);
        Some(Arc::clone(&self.lru.get(slot).event))
    }

    /// Applies `update` when its event is stored, which then counts as used.
    fn update(&mut self, update: &StatusUpdate) {
        let Some(&slot) = self.by_id.get(&update.id) else { return };
        let event = Arc::make_mut(&mut self.lru.get_mut(slot).event);
        self.by_status[status_index(event.status)] -= 1;
        update.apply_to(event);
        self.by_status[status_index(event.status)] += 1;
        self.lru.touch(slot);
    }

    fn remove(&mut self, id: EventId) -> Option<Entry> {
        let slot = self.by_id.remove(&id)?;
        let entry = self.lru.remove(slot);
        self.by_time.remove(&(entry.event.created_at, id));
        self.by_seq.remove(&entry.seq);
        self.by_status[status_index(entry.event.status)] -= 1;
        Some(entry)
    }

    fn evict_least_recent(&mut self) {
        if let Some(slot) = self.lru.back() {
            let id = self.lru.get(slot).event.id;
            self.remove(id);
        }
    }

    /// Ids of completed and failed events created before `cutoff`.
    fn finished_before(&self, cutoff: Timestamp) -> Vec<EventId> {
        self.by_time
            .range(..(cutoff, MIN_ID))
            .filter(|&(_, &slot)| self.lru.get(slot).event.status.is_terminal())
            .map(|(&(_, id), _)| id)
            .collect()
    }

    /// The page of events `filter` selects, in `(created_at, id)` order.
    fn list(&self, filter: &EventFilter) -> Vec<Arc<Event>> {
        let start = filter.start_time.unwrap_or(Timestamp::MIN);
        let in_window = self.by_time.range((start, MIN_ID)..);
        let in_window =
            in_window.take_while(|((created_at, _), _)| filter.end_time.is_none_or(|end| *created_at < end));
        in_window
            .map(|(_, &slot)| &self.lru.get(slot).event)
            .filter(|event| filter.matches(event))
            .skip(filter.offset)
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    fn replay(&self, from: ReplayFrom, pattern: Option<&Pattern>, limit: usize) -> Vec<(u64, Arc<Event>)> {
        let (first_seq, not_before) = match from {
            ReplayFrom::Beginning => (0, None),
            ReplayFrom::Sequence(seq) => (seq, None),
            ReplayFrom::Time(at) => (0, Some(at)),
        };
        self.by_seq
            .range(first_seq..)
            .map(|(&seq, &slot)| (seq, &self.lru.get(slot).event))
            .filter(|(_, event)| not_before.is_none_or(|at| event.created_at >= at))
            .filter(|(_, event)| pattern.is_none_or(|p| p.matches(&event.event_type)))
            .take(limit)
            .map(|(seq, event)| (seq, Arc::clone(event)))
            .collect()
    }
}

impl Log for EventTable {
    fn get(&self, seq: u64) -> Option<(&Arc<Event>, Option<&str>)> {
        let entry = self.lru.get(*self.by_seq.get(&seq)?);
        Some((&entry.event, entry.origin.as_deref()))
    }

    fn from(&self, first: u64) -> impl Iterator<Item = (u64, &Arc<Event>, Option<&str>)> {
        self.by_seq.range(first..).map(|(&seq, &slot)| {
            let entry = self.lru.get(slot);
            (seq, &entry.event, entry.origin.as_deref())
        })
    }

    fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// The stored dead letters, in `(failed_at, id)` order.
struct LetterTable {
    by_time: BTreeMap<(Timestamp, DeadLetterId), DeadLetter>,
    failed_at: HashMap<DeadLetterId, Timestamp, foldhash::fast::RandomState>,
    dropped: u64,
}

impl LetterTable {
    fn new() -> Self {
        Self { by_time: BTreeMap::new(), failed_at: HashMap::default(), dropped: 0 }
    }

    fn len(&self) -> usize {
        self.by_time.len()
    }

    fn upsert(&mut self, letter: DeadLetter, max: usize) {
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

    fn get(&self, id: DeadLetterId) -> Option<&DeadLetter> {
        let failed_at = self.failed_at.get(&id)?;
        self.by_time.get(&(*failed_at, id))
    }

    fn remove(&mut self, id: DeadLetterId) -> Option<DeadLetter> {
        let failed_at = self.failed_at.remove(&id)?;
        self.by_time.remove(&(failed_at, id))
    }

    fn list(&self, filter: &DeadLetterFilter) -> Vec<DeadLetter> {
        self.by_time
            .values()
            .filter(|letter| filter.matches(letter))
            .skip(filter.offset)
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }
}
