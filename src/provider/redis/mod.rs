//! Redis Streams: durable storage and cross-instance delivery through one Redis server
//! (feature `redis`).
//!
//! Every broker (or service) sharing one Redis uses a **key prefix**, and everything this provider
//! keeps lives under it, so several can share a server without seeing each other. Connections use
//! the blocking client with socket timeouts ([`RedisConfig::timeout`], 5 s by default) on every
//! call, reconnect with exponential backoff (50 ms doubling to [`RedisConfig::max_backoff`], 2 s),
//! and accept `redis://` and `rediss://` (TLS, through rustls) URLs with a username and password.
//! While Redis is down every call fails with [`ProviderErrorKind::Unavailable`], the one transient
//! kind: the broker's writer keeps its batch and retries, and local dispatch goes on.
//!
//! ## Layout
//! With prefix `P` (default `eventbroker`) and stream name `S` (default `events`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:S` | stream | one entry per stored event: `event` (the seed's JSON), `id`, `type`, `source`, `status`, `instance_id` (the seed's fields) and `origin` (the publishing group's [`ConsumerGroup::key`], absent for none) |
//! | `P:pending` | hash | the record of each event stored pending whose status has not changed since: event id → `<entry id> <time key>` |
//! | `P:status:<event id>` | hash | the record of every other event, made at its first status change (or at its store, when stored with another status or stored again): `entry` (its stream entry id), `time`, `status`, and whatever changed since it was stored (`error`, `retry_count`, `processed_at`, `completed_at`, or a whole re-stored `event`) |
//! | `P:time` | sorted set | `<created_at as 21 digits>:<id>`, all scored 0: `(created_at, id)` order by `BYLEX`, exact to the nanosecond |
//! | `P:expiry` | sorted set | finished events by the time their status expires |
//! | `P:order` | list | `<entry id> <event id>` of each entry the provider added, in stream order, while `max_len` bounds the stream: what trimming removes next |
//! | `P:counts` | hash | stored events in total and per status, and what was trimmed, expired or replaced |
//! | `P:dead` | hash | dead letters by id, each `<order key> <JSON>` |
//! | `P:dead:order` | sorted set | `<failed_at as 21 digits>:<dead letter id>`: `(failed_at, id)` order |
//! | `P:S:lost` | hash | consumer group key → entries the group lost, trimmed before it read them |
//! | `P:S:naks:<group>` | sorted set | entries of consumer group `<group>` given back with a nak longer than its claim idle time, scored by when they are due again (server time, ms); a record goes once due |
//!
//! Statuses never become stream entries (SEED-PITFALLS 4): a status change is a write to the
//! event's hash. An event is in exactly one of `P:pending` and its own hash: a new pending event
//! costs a field of one hash shared by the batch rather than a key of its own, and its first status
//! change moves it to a hash of its own (a namespace written before `P:pending` existed, with a
//! hash for every event, reads the same). Once an event is finished (completed or failed), its
//! hash gets a TTL of [`RedisConfig::status_ttl`] (7 days by default, as the seed's), and the event
//! is then gone from every query; pending and processing events never expire. The expiry is also
//! recorded in `P:expiry`, so the scripts remove the event from every index with exact counts even
//! when Redis expired the hash first: each write script purges up to 256 expired events, and
//! `stats` purges every one due (1024 per round trip, up to 256 round trips) before it counts.
//! Dead letters live in a hash and a sorted set rather than a stream, since
//! they are read, replaced and deleted by id and listed by `failed_at`, which is not store order.
//!
//! Entries written by something else (the Go seed, `redis-cli XADD` with the seed's fields) are
//! delivered to inbound sources like any other; having no record, they are not part of the
//! store (`get`, `list`, `replay`, `stats`).
//!
//! ## Writes
//! - **One round trip per batch.** `store_batch`, `update_status_batch` and `store_dead_letters`
//!   each run one Lua script over the whole batch (in chunks of 1024), so a batch is applied
//!   atomically and costs one round trip. Inside Redis a new pending event costs one command
//!   (`XADD`) and a field in each of the batch's gathered writes; a status update costs two
//!   (`HMGET`, `HSET`, plus `PEXPIRE` when it finishes the event, and an `HGET` of `P:pending`
//!   at the event's first change). A batch adds one `EXISTS` over its ids' hashes and one `HMGET`
//!   of `P:pending`, one `HSET` to `P:pending`, one `RPUSH` to the order list, one `LINDEX` of it
//!   and one `XRANGE` of the stream's first entry (the last three while `max_len` bounds the
//!   stream), and one `ZADD` and one `ZREM` per index. Trimming reads the trimmed events' pending records with one `HMGET`, and
//!   each of the others' hashes with an `HMGET` of its own, then removes them with one `HDEL` and
//!   one `DEL`, and their entries with one `XDEL`.
//!   (Every command a script runs costs Redis a few microseconds beyond its own work, which is
//!   why the scripts gather what they can into one command per batch.)
//! - **Idempotent stores.** The script looks the batch's ids up before their `XADD`s (one `EXISTS`
//!   over their hashes and one `HMGET` of `P:pending`, then a lookup per event only when some hash
//!   exists): an id already stored is a re-store, which puts the new body in the event's hash (made
//!   now for a pending record) and keeps the stream entry, so the event keeps its sequence number
//!   and origin and is not delivered again. A batch retried after a lost reply therefore never
//!   creates a second entry.
//! - **Bounded stream.** Once the stream holds more than [`RedisConfig::max_len`] entries (100 000
//!   by default) plus 1 % slack, the store script removes the oldest (up to 1024 per call) and
//!   their events from every index: an approximate `MAXLEN` with exact counts. It finds their
//!   events in `P:order` rather than by reading the entries (whose bodies a script would have to
//!   copy in), and deletes exactly the entries it names; the stream itself is read only for
//!   entries older than any the list names (another writer's, or those of a provider on the same
//!   prefix whose `max_len` is 0, once they are the oldest). Entries of ours that another writer
//!   removed from the head of the stream (the seed's `XADD … MAXLEN ~`, shorter than `max_len`)
//!   take their events with them at the next store, counted as trimmed; with `max_len` 0 there
//!   is no list, and such events stay counted. A deleted event's name stays in the list until
//!   trimming reaches it, and removes nothing: trimming takes further names until the stream is
//!   back at `max_len` plus slack, reading at most 2048 names a call (more deleted names among the
//!   oldest than that leave the stream longer until the next stores). A consumer group more than `max_len` entries behind loses the trimmed
//!   ones, counted by [`Inbound::lost`] (see Inbound delivery).
//!
//! ## Reads
//! Nothing on a read path blocks (no `XREAD BLOCK`; SEED-PITFALLS 2). `get` is one script call
//! (the record, from the event's hash or `P:pending`, then the entry). `list` walks `P:time` in
//! pages of 256 from the filter's `start_time` to its `end_time` (`[start, end)`), applies every
//! other filter, then the offset and the limit: O(events in the time window). `replay` walks the stream in pages of 256 from the
//! requested entry, reading each entry's record, and looks
//! at no more than 4096 entries a call (16 round trips, about 60 ms on a loopback server), nor
//! starts a round trip once half of [`RedisConfig::timeout`] is gone. A page that passes over
//! entries it does not return (other types, events deleted or expired, other writers' entries) may
//! then hold fewer events than asked for, or none, with `end` false and `next` past the last entry
//! it looked at: a rare pattern over hundreds of thousands of entries (14 µs each, so about
//! 350 000 fill the 5 s default timeout) moves on call by call instead of failing at one place.
//!
//! **A replay from a time** starts at the earliest entry that can hold an event created at or
//! after it, found without reading the stream (one script call: a `BYLEX` range of `P:time` and
//! each event's record): exact, with no clock involved, while at most 4096 stored events were
//! created since (the earliest of their entries; the stream's last entry when there is none, so
//! the call ends at once). Beyond 4096, an event not read may sit earlier in the stream (created
//! out of order), and the start is also no later than entry `<t − 60 s>-0`: the rule is that a
//! publisher's clock (`created_at`) runs at most 60 s ahead of Redis' (entry ids are Redis' clock
//! at `XADD`, never going back, and an event is stored after it is created). An event created more
//! than 60 s ahead of Redis' clock, or re-stored with a `created_at` over 60 s past its entry, can
//! be missed then, and only then; the scan passes over the 60 s of entries before `t` (60 000 at
//! 1 000 events/s, 15 calls of empty pages).
//!
//! **Sequence numbers** are stream entry ids packed into a `u64`: entry `ms-n` is
//! `ms << 20 | n`. Entry ids strictly increase, so these do too, and the mapping is exact while `n`
//! stays below 2²⁰, which the store script guarantees for its own entries by moving to the next
//! millisecond when `n` reaches 2¹⁹ (Redis' clock would have to stand still for half a million
//! `XADD`s). [`ReplayFrom::Sequence`]`(s)` reads from entry `(s >> 20)-(s & 0xFFFFF)`.
//!
//! ## Inbound delivery
//! Each [`ConsumerGroup`] is a Redis consumer group named by its key (`instance:<id>` for fan-out,
//! `shared:<name>` for a work-queue), created at the stream's current end (`$`, with `MKSTREAM`)
//! the first time any member opens it (SEED-PITFALLS 3); its members are Redis consumers named by
//! their instance id. A fetch, on the source's own connection:
//! 1. hands out again this member's own pending entries that are due: those its predecessor left
//!    (read from the pending list when the source opened) and those given back with a nak;
//! 2. takes over entries other members left pending for [`InboundConfig::claim_idle`], scanning the
//!    pending list at most every `min(claim_idle / 4, 1 s)` (`XPENDING … IDLE` then `XCLAIM`, in one
//!    script; `XAUTOCLAIM` cannot leave out the member's own entries, which it must not hand
//!    itself twice while a handler still runs);
//! 3. reads new entries with `XREADGROUP … >` in a script that first counts what the group lost
//!    (below), then, when nothing came, waits for new entries with a blocking `XREADGROUP`, at most
//!    500 ms at a time within `wait`.
//!
//! **Lost entries.** A group more than `max_len` entries behind loses the trimmed ones, and
//! [`Inbound::lost`] (every member's) reports how many the group lost, kept per group in `P:S:lost`
//! so it survives restarts. Redis 7 keeps how many entries a stream ever had (`entries-added`) and
//! how many a group read (`entries-read`); the read script compares them, atomically, before it
//! reads, when the stream's first entry is past the member's last read entry (one `XRANGE … COUNT
//! 1` a read; `XINFO GROUPS` and `XINFO STREAM` only then), and after each claim scan (at most
//! every `min(claim_idle / 4, 1 s)`), when the group has read the last entry: the unread entries
//! before the first are `entries-added - length`, and all of them once it has read the last. What
//! the group's counter falls short of is lost; it is counted once, and the counter set right
//! (`XGROUP SETID … ENTRIESREAD`). Exact, with three limits: trimmed entries the group would have
//! skipped (its own echoes, types its members' filter refuses) count too, their bodies being gone;
//! nothing is counted while the group's counter is unknown to Redis (a group made before this
//! counting, by Redis 7.0 at `$` without `ENTRIESREAD`, until it first reads the stream's last
//! entry) or while the stream holds entries deleted by id past its first; and an entry another
//! client deletes by id (`XDEL`) before the group read it counts as lost too, since Redis 7.0's
//! counter skips it when the group reads past it. [`EventStore::delete`] is no loss: its script
//! credits the entry to every group that had not read it (one `XINFO GROUPS`, and one `XGROUP
//! SETID … ENTRIESREAD` per such group whose counter Redis knows), so the counter stays exact.
//!
//! Entries the group published itself (echo) and entries whose type the member's filter does not
//! want are acknowledged (`XACK`, for this group only) without being delivered; so are entries that
//! hold no event (counted as `inbound_malformed`). `ack` is one `XACK`. `extend` resets the idle
//! time of the entries the member still owns (`XCLAIM … JUSTID`). Redis has no delayed redelivery,
//! so a `nak` with delay `d` up to the claim idle time sets the entries' idle time to `claim_idle -
//! d` (another member may take them once `d` has passed); a longer one, which an idle time cannot
//! express, sets it to 0 and records the entries as due at `now + d` (server time) in
//! `P:S:naks:<group>`, and every claim (other members' scans, and a next incarnation's takeover of
//! what its predecessor left) skips an entry until its record is due. Either way the source itself
//! hands them out again when `d` has passed, and nobody takes them earlier, to the millisecond of
//! Redis' clock (a claim scan runs at most every `min(claim_idle / 4, 1 s)`, so another member
//! takes them within that much after `d`). Closing a source of a shared group releases its pending
//! entries to the other members at once.
//!
//! **Consumers leave their group**, so members that come and go (containers with generated
//! names) do not pile up in `XINFO CONSUMERS`: a source that closes holding no pending entry
//! removes its consumer (`XGROUP DELCONSUMER`, in a script that checks its `XPENDING` first, since
//! removing a consumer drops what it holds). Every member of a shared group also sweeps the
//! group's consumer list at most once per `max(10 × claim_idle, 1 s)` (5 min with the default
//! 30 s), on a fetch, removing up to 1000 consumers other than itself that hold no pending entry
//! and were handed nothing for that long: crashed members, and closed ones once the others
//! claimed what they left. Redis 7.0 counts a consumer's idle time from the last read that handed
//! it something, so a live member with nothing to do may be removed too; it held nothing, loses
//! nothing, and its next read adds it again. A consumer holding entries is never removed.
//!
//! A fetch that fails after Redis may have moved entries into the member's pending list (a read
//! whose reply was lost) makes the next fetch hand out the ones the member neither holds nor gave
//! back. A group that vanished (its stream deleted, or a Redis restarted without persistence) is
//! created again after the last entry the member read, so what other instances stored since (their
//! writers retry their batches as soon as Redis answers) still reaches it; on a stream that never
//! reached that entry, from the stream's beginning.
//!
//! The stream carries every group's events, so a member reads, and acknowledges unseen, the events
//! its own group published (echoes) and those its filter does not want
//! ([`Capabilities::filter_at_source`] is false): fan-out costs each instance one read of every
//! event. Counted in [`ProviderStats::provider_specific`]: `inbound_echoes_skipped`,
//! `inbound_filtered`, `inbound_redelivered`, `inbound_lost` (pending entries found deleted or
//! trimmed, which [`Inbound::lost`] leaves out: they were handed out) and `inbound_malformed`,
//! next to `stream_length`, `trimmed`, `expired`, `replaced`, `dead_letters_dropped` and
//! `reconnects`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use eventbroker::{Event, EventSink, EventSource, EventStore, RedisConfig, RedisProvider};
//!
//! let provider = RedisProvider::connect(RedisConfig {
//!     key_prefix: "orders-service".into(),
//!     ..RedisConfig::new("redis://:secret@127.0.0.1:6379/0")
//! })?;
//! let event = Arc::new(Event::new(EventSource::System, "orders.created"));
//! provider.store_batch(&[Arc::clone(&event)], None)?;
//! assert_eq!(provider.get(event.id)?.map(|e| e.id), Some(event.id));
//! # Ok::<(), eventbroker::ProviderError>(())
//! ```
//!
//! [`ConsumerGroup::key`]: crate::ConsumerGroup::key
//! [`ConsumerGroup`]: crate::ConsumerGroup
//! [`Inbound::lost`]: crate::Inbound::lost

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use redis::Value;

use self::conn::{Dialer, Pool};
use self::keys::{Keys, TimeKey, entry_of_seq, lex_from, lex_to, seq_after_entry, seq_of_entry};
use self::reply::{Entry, Malformed, StatusHash};
use self::scripts::{Call, Scripts};
use super::{
    Capabilities, ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter, EventSink,
    EventStore, GroupNamespace, Inbound, InboundConfig, Provider, ProviderStats, ReplayFrom, ReplayPage,
    StatusUpdate, StoredEvent, closed_error,
};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::event::{Event, EventId};
use crate::pattern::Pattern;

mod conn;
mod inbound;
mod keys;
mod reply;
mod scripts;

const NAME: &str = "redis";

/// Most events, updates or dead letters per script call.
const WRITE_CHUNK: usize = 1024;
/// Most entries the store script trims per call.
const TRIM_CHUNK: usize = 1024;
/// Time keys, entries or dead letters read per round trip by `list`, `replay` and
/// `list_dead_letters`.
const PAGE: usize = 256;
/// Most stream entries one `replay` call looks at: 16 round trips of [`PAGE`], about 60 ms on a
/// loopback Redis (measured: 14 µs an entry, so 100 000 entries in one call took 1.4 s and some
/// 350 000 would outlast the 5 s default timeout); a page that passes over a long run of entries
/// it does not return ends far within it.
const REPLAY_LOOK_MAX: usize = 16 * PAGE;
/// Most time keys a replay from a time reads to find where in the stream it starts: as many as one
/// call's entries ([`REPLAY_LOOK_MAX`]), one script call of a few milliseconds.
const REPLAY_START_KEYS: usize = REPLAY_LOOK_MAX;
/// How far a publisher's clock (an event's `created_at`) may run ahead of Redis' (its entry id) for
/// a replay from a time to find the event when more than [`REPLAY_START_KEYS`] events were created
/// since that time: the scan then starts this long before it (60 s, in ms).
const PUBLISHER_AHEAD_MAX_MS: i64 = 60_000;
/// Longest status TTL: 2⁵³ ms, the integers a script's numbers hold exactly (and far below what
/// `PEXPIRE` refuses).
const MAX_STATUS_TTL_MS: u128 = 1 << 53;
/// Expired events `stats` purges per round trip, before it counts.
const STATS_PURGE: usize = 1024;
/// Most round trips `stats` purges in (a backlog of about 256 000 expired events): a bound on the
/// call, however fast events finish meanwhile.
const STATS_PURGE_ROUNDS: usize = 256;

/// Settings of a [`RedisProvider`].
///
/// ```
/// use std::time::Duration;
/// use eventbroker::RedisConfig;
///
/// let config = RedisConfig {
///     key_prefix: "billing".into(),
///     max_len: 1_000_000,
///     status_ttl: Some(Duration::from_secs(24 * 3600)),
///     ..RedisConfig::new("rediss://app:secret@redis.internal:6380/2")
/// };
/// assert_eq!(config.stream, "events");
/// assert!(!format!("{config:?}").contains("secret"), "Debug hides the password");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user][:password@]host[:port][/db]`, or `rediss://…` for TLS. Default
    /// `redis://127.0.0.1:6379`.
    pub url: String,
    /// What every key starts with (`<prefix>:`); brokers or services that must not see each other
    /// use different prefixes. ASCII letters, digits and `_ - . : { }`. Default `eventbroker`.
    pub key_prefix: String,
    /// The stream's name under the prefix. Default `events`.
    pub stream: String,
    /// Most entries the stream keeps, approximately (1 % slack); the oldest go first, with their
    /// events. 0 keeps everything. Default 100 000.
    pub max_len: usize,
    /// How long a finished (completed or failed) event is kept after its last status change;
    /// `None` keeps it until trimmed. At most 2⁵³ ms (about 285 000 years), what the scripts
    /// compute with exactly. Default 7 days.
    pub status_ttl: Option<Duration>,
    /// Most dead letters kept; beyond that the one that failed earliest is dropped. Default 100 000.
    pub max_dead_letters: usize,
    /// Bound of every call: connecting, and each read or write of a command. Default 5 s.
    pub timeout: Duration,
    /// Longest wait between connection attempts while Redis is unreachable. Default 2 s.
    pub max_backoff: Duration,
    /// The name connections give themselves (`CLIENT SETNAME`), as `CLIENT LIST` shows them.
    /// Default `eventbroker`.
    pub client_name: String,
}

impl RedisConfig {
    /// The default settings with `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Self::default() }
    }

    fn validate(&self) -> Result<(), ProviderError> {
        keys::validate_key_part("key prefix", &self.key_prefix)?;
        keys::validate_key_part("stream name", &self.stream)?;
        keys::validate_key_part("client name", &self.client_name)?;
        if self.timeout.is_zero() {
            return Err(keys::invalid("configure", "timeout must be above zero".into()));
        }
        if self.status_ttl.is_some_and(|ttl| ttl.as_millis() == 0) {
            return Err(keys::invalid("configure", "status_ttl must be at least 1 ms, or None".into()));
        }
        if let Some(ttl) = self.status_ttl.filter(|ttl| ttl.as_millis() > MAX_STATUS_TTL_MS) {
            return Err(keys::invalid(
                "configure",
                format!(
                    "status_ttl must be at most {MAX_STATUS_TTL_MS} ms (2^53), or None to keep finished events; got {ttl:?}"
                ),
            ));
        }
        Ok(())
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "eventbroker".into(),
            stream: "events".into(),
            max_len: 100_000,
            status_ttl: Some(Duration::from_secs(7 * 24 * 3600)),
            max_dead_letters: 100_000,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(2),
            client_name: "eventbroker".into(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &crate::redact::redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("stream", &self.stream)
            .field("max_len", &self.max_len)
            .field("status_ttl", &self.status_ttl)
            .field("max_dead_letters", &self.max_dead_letters)
            .field("timeout", &self.timeout)
            .field("max_backoff", &self.max_backoff)
            .field("client_name", &self.client_name)
            .finish()
    }
}

/// The Redis Streams [`Provider`]; see the [module docs](self) for the layout and guarantees.
///
/// Thread-safe and cheap to share: calls take a pooled connection (up to 8 idle ones are kept), so
/// the writer thread, queries and acks run side by side; each inbound source has a connection of
/// its own for its blocking reads. Two `RedisProvider`s with the same settings behave like two
/// processes sharing the server.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use eventbroker::{Broker, Distribution, Provider, RedisConfig, RedisProvider};
///
/// let provider: Arc<dyn Provider> = Arc::new(RedisProvider::connect(RedisConfig::new("redis://127.0.0.1:6379"))?);
/// // Two instances of a service: every event one publishes reaches the other's handlers once.
/// let api_1 = Broker::builder().provider(Arc::clone(&provider)).instance_id("api-1").build()?;
/// let api_2 = Broker::builder().provider(provider).instance_id("api-2").distribution(Distribution::FanOut).build()?;
/// api_2.subscribe_infallible("orders.>", |event| println!("api-2 got {}", event.id))?;
/// api_1.publish_async(eventbroker::Event::new(eventbroker::EventSource::System, "orders.created"))?;
/// api_1.shutdown(Duration::from_secs(5));
/// api_2.shutdown(Duration::from_secs(5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RedisProvider {
    shared: Arc<Shared>,
}

/// What the provider and its inbound sources share.
struct Shared {
    config: RedisConfig,
    /// The server, database and stream: where the consumer groups live.
    namespace: GroupNamespace,
    keys: Keys,
    pool: Pool,
    scripts: Scripts,
    closed: AtomicBool,
    counters: Counters,
}

/// What this handle did; Relaxed everywhere: statistics, nothing is published through them.
#[derive(Default)]
struct Counters {
    published: AtomicU64,
    consumed: AtomicU64,
    open_sources: AtomicU64,
    redelivered: AtomicU64,
    echoes_skipped: AtomicU64,
    filtered: AtomicU64,
    lost: AtomicU64,
    malformed: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn sub_one(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl RedisProvider {
    /// A provider with `config`, as `NatsProvider::connect` and `PostgresProvider::connect` make
    /// theirs (features `nats` and `postgres`). The settings are checked now; the connection is
    /// made on first use, so Redis need not be up yet (see [`RedisProvider::ping`]).
    ///
    /// ```
    /// use eventbroker::{ProviderErrorKind, RedisConfig, RedisProvider};
    ///
    /// let bad = RedisProvider::connect(RedisConfig { key_prefix: "has space".into(), ..RedisConfig::default() });
    /// assert!(matches!(bad.unwrap_err().kind(), ProviderErrorKind::InvalidInput(_)));
    /// let bad = RedisProvider::connect(RedisConfig::new("http://127.0.0.1"));
    /// assert!(matches!(bad.unwrap_err().kind(), ProviderErrorKind::InvalidInput(_)));
    /// ```
    ///
    /// # Errors
    /// [`ProviderErrorKind::InvalidInput`] for a URL that does not parse or an invalid name.
    pub fn connect(config: RedisConfig) -> Result<Self, ProviderError> {
        config.validate()?;
        let dialer = Dialer::new(&config)?;
        let keys = Keys::new(&config.key_prefix, &config.stream);
        // The groups live on the stream's key: `a:b` + `c` and `a` + `b:c` are one stream.
        let namespace = GroupNamespace::new(NAME, format!("{}, stream {}", dialer.server(), keys.stream));
        Ok(Self {
            shared: Arc::new(Shared {
                namespace,
                keys,
                pool: Pool::new(dialer),
                scripts: Scripts::new(),
                closed: AtomicBool::new(false),
                counters: Counters::default(),
                config,
            }),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// Checks that Redis answers, within the timeout.
    ///
    /// ```no_run
    /// # use eventbroker::{RedisConfig, RedisProvider};
    /// let provider = RedisProvider::connect(RedisConfig::default())?;
    /// provider.ping()?;
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    ///
    /// # Errors
    /// [`ProviderErrorKind::Unavailable`] when it does not; `Closed` after close.
    pub fn ping(&self) -> Result<(), ProviderError> {
        self.shared.check_open("ping")?;
        self.shared.pool.run("ping", "PING", |conn| redis::cmd("PING").exec(conn))
    }
}

impl Drop for RedisProvider {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl fmt::Debug for RedisProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisProvider")
            .field("config", &self.shared.config)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn check_open(&self, operation: &'static str) -> Result<(), ProviderError> {
        // Acquire: pairs with the Release in `close`, so a call that sees the provider open also
        // sees everything done before it was closed (nothing is, but the pairing keeps it honest).
        if self.closed.load(Ordering::Acquire) { Err(closed_error(NAME, operation)) } else { Ok(()) }
    }

    fn ttl_ms(&self) -> u128 {
        self.config.status_ttl.map_or(0, |ttl| ttl.as_millis())
    }

    fn malformed(&self, operation: &'static str, what: &Malformed) -> ProviderError {
        ProviderError::new(
            NAME,
            operation,
            ProviderErrorKind::Backend(format!("{}: {}", self.keys.prefix, what.0)),
        )
    }
}

/// A timestamp as the update script takes it: RFC 3339, or empty for none (the stored value stays).
struct Stamp(Option<jiff::Timestamp>);

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.map_or(Ok(()), |at| fmt::Display::fmt(&at, f))
    }
}

impl EventSink for RedisProvider {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("store_batch")?;
        let keys = &shared.keys;
        let slack = shared.config.max_len / 100;
        for chunk in events.chunks(WRITE_CHUNK) {
            let mut call = Call::new(
                &shared.scripts.store,
                &[&keys.stream, &keys.counts, &keys.time, &keys.expiry, &keys.pending, &keys.order],
            );
            call.arg(&keys.status)
                .arg(shared.config.max_len)
                .arg(slack)
                .arg(TRIM_CHUNK)
                .arg(shared.ttl_ms())
                .arg(origin.unwrap_or(""));
            for event in chunk {
                call.arg(event.id)
                    .arg_json(&**event)
                    .arg(event.event_type.as_str())
                    .arg(event.source.as_str())
                    .arg(event.status.as_str())
                    .arg(event.instance_id.as_str())
                    .arg(TimeKey(event.created_at, event.id));
            }
            let fresh: usize = shared.pool.run("store_batch", &keys.stream, |conn| call.invoke(conn))?;
            Counters::add(&shared.counters.published, fresh);
        }
        Ok(())
    }

    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("update_status_batch")?;
        let keys = &shared.keys;
        for chunk in updates.chunks(WRITE_CHUNK) {
            let mut call = Call::new(
                &shared.scripts.update,
                &[&keys.stream, &keys.counts, &keys.time, &keys.expiry, &keys.pending],
            );
            call.arg(&keys.status).arg(shared.ttl_ms());
            for update in chunk {
                call.arg(update.id)
                    .arg(update.status.as_str())
                    .arg(&update.error)
                    .arg(update.retry_count)
                    .arg(Stamp(update.processed_at))
                    .arg(Stamp(update.completed_at));
            }
            shared.pool.run("update_status_batch", &keys.status, |conn| call.invoke::<()>(conn))?;
        }
        Ok(())
    }

    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError> {
        let shared = &*self.shared;
        shared.check_open("store_dead_letters")?;
        let keys = &shared.keys;
        for chunk in letters.chunks(WRITE_CHUNK) {
            let mut call =
                Call::new(&shared.scripts.dead_store, &[&keys.dead, &keys.dead_order, &keys.counts]);
            call.arg(shared.config.max_dead_letters);
            for letter in chunk {
                let json = serde_json::to_string(letter).map_err(|error| {
                    ProviderError::new(
                        NAME,
                        "store_dead_letters",
                        ProviderErrorKind::InvalidInput(format!("dead letter {}: {error}", letter.id)),
                    )
                })?;
                call.arg(letter.id).arg(TimeKey(letter.failed_at, letter.id)).arg(json);
            }
            shared.pool.run("store_dead_letters", &keys.dead, |conn| call.invoke::<()>(conn))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ProviderError> {
        // Every write is applied by Redis before its call returns; nothing is buffered here.
        self.shared.check_open("flush")
    }
}

impl RedisProvider {
    /// Up to `limit` stored events from `from` on, as [`EventStore::replay`] pages them, having
    /// looked at no more than [`REPLAY_LOOK_MAX`] stream entries, nor started a round trip once half
    /// the timeout was gone: entries the page passes over (other types, expired or deleted events,
    /// other writers' entries) are read too, and a rare pattern over a long stream would otherwise
    /// read all of it in one call, past any timeout, and fail the same way at every retry.
    fn replay_page(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<ReplayPage, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("replay")?;
        let mut events = Vec::new();
        if limit == 0 {
            return Ok(ReplayPage::from_events(events, limit));
        }
        let (mut start, not_before) = match from {
            ReplayFrom::Beginning | ReplayFrom::Sequence(0) => ("-".to_owned(), None),
            ReplayFrom::Sequence(seq) => (entry_of_seq(seq), None),
            ReplayFrom::Time(at) => (self.replay_start(at)?, Some(at)),
        };
        // Each round trip is bounded by the socket timeout; this bounds how many start.
        let read_until = crate::deadline::from_now(shared.config.timeout / 2);
        let keys = &shared.keys;
        let mut looked = 0;
        loop {
            let mut call = Call::new(&shared.scripts.replay_page, &[&keys.stream, &keys.pending]);
            call.arg(&keys.status).arg(&start).arg(PAGE);
            let value: Value = shared.pool.run("replay", &keys.stream, |conn| call.invoke(conn))?;
            let page = reply::array(value)
                .ok_or_else(|| shared.malformed("replay", &Malformed::new("not an array")))?;
            let read = page.len();
            looked += read;
            let mut last = None;
            for item in page {
                let (entry_id, found) =
                    replay_item(item).map_err(|error| shared.malformed("replay", &error))?;
                last = Some(entry_id);
                let Some((seq, event)) = found else { continue };
                let wanted = not_before.is_none_or(|at| event.created_at >= at)
                    && pattern.is_none_or(|p| p.matches(&event.event_type));
                if wanted {
                    events.push(StoredEvent { seq, event });
                    if events.len() == limit {
                        return Ok(ReplayPage::from_events(events, limit));
                    }
                }
            }
            let Some(last) = last else {
                // Nothing at or after `start`: the first call of an empty stream, or one that
                // ended exactly where the previous call stopped.
                return Ok(ReplayPage { events, next: None, end: true });
            };
            // `None`: nothing after `last` maps to a sequence number, so none of it is the store's.
            let Some(next) = seq_after_entry(&last) else {
                return Ok(ReplayPage { events, next: None, end: true });
            };
            if read < PAGE {
                return Ok(ReplayPage { events, next: Some(next), end: true });
            }
            if looked >= REPLAY_LOOK_MAX || Instant::now() >= read_until {
                return Ok(ReplayPage::continues_at(events, next));
            }
            start = format!("({last}");
        }
    }
}

impl RedisProvider {
    /// Where a replay from `at` starts reading the stream (an XRANGE start): no later than the
    /// entry of any event created at or after `at`. Exact, from the time index, while at most
    /// [`REPLAY_START_KEYS`] stored events were created since; beyond that no later than
    /// [`PUBLISHER_AHEAD_MAX_MS`] before `at` by the entry ids' clock too.
    fn replay_start(&self, at: Timestamp) -> Result<String, ProviderError> {
        let shared = &*self.shared;
        let keys = &shared.keys;
        // An entry id is Redis' clock at its `XADD` (or later: ids never go back), so an event
        // created at `at` by a publisher at most `PUBLISHER_AHEAD_MAX_MS` ahead of Redis sits at or
        // after this millisecond. Before the epoch, the stream's first entry.
        let bound = at.as_millisecond().saturating_sub(PUBLISHER_AHEAD_MAX_MS).max(0);
        let mut call = Call::new(&shared.scripts.replay_start, &[&keys.time, &keys.stream, &keys.pending]);
        call.arg(&keys.status).arg(lex_from(Some(at))).arg(REPLAY_START_KEYS).arg(format_args!("{bound}-0"));
        let value: Value = shared.pool.run("replay", &keys.time, |conn| call.invoke(conn))?;
        let start = reply::string(value)
            .ok_or_else(|| shared.malformed("replay", &Malformed::new("the start is not an entry id")))?;
        // The start is inclusive: the entry found is one to return.
        Ok(start)
    }
}

impl EventStore for RedisProvider {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("get")?;
        let keys = &shared.keys;
        let key = keys.status_of(id);
        let mut call = Call::new(&shared.scripts.get, &[&keys.stream, &keys.pending]);
        call.arg(&keys.status).arg(id);
        let value: Value = shared.pool.run("get", &key, |conn| call.invoke(conn))?;
        reply::record(value).map_err(|error| shared.malformed("get", &error))
    }

    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("list")?;
        let keys = &shared.keys;
        let to = lex_to(filter.end_time);
        let page = |from: &str| {
            let mut call = Call::new(&shared.scripts.list_page, &[&keys.time, &keys.stream, &keys.pending]);
            call.arg(&keys.status).arg(from).arg(&to).arg(PAGE);
            let value: Value = shared.pool.run("list", &keys.time, |conn| call.invoke(conn))?;
            list_page(value).map_err(|error| shared.malformed("list", &error))
        };
        let select = |record| {
            // `None`: expired or trimmed between the index and the record.
            let event = reply::record(record).map_err(|error| shared.malformed("list", &error))?;
            Ok(event.filter(|event| filter.matches(event)))
        };
        scan_pages(lex_from(filter.start_time), filter.offset, filter.limit, page, select)
    }

    fn delete(&self, id: EventId) -> Result<bool, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("delete")?;
        let keys = &shared.keys;
        let mut call = Call::new(
            &shared.scripts.delete,
            &[&keys.stream, &keys.counts, &keys.time, &keys.expiry, &keys.pending],
        );
        call.arg(&keys.status).arg(id);
        let deleted: i64 = shared.pool.run("delete", &keys.status_of(id), |conn| call.invoke(conn))?;
        Ok(deleted == 1)
    }

    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<ReplayPage, ProviderError> {
        self.replay_page(from, pattern, limit)
    }

    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("list_dead_letters")?;
        let keys = &shared.keys;
        let to = lex_to(filter.end_time);
        let page = |from: &str| {
            let mut call = Call::new(&shared.scripts.dead_page, &[&keys.dead_order, &keys.dead]);
            call.arg(from).arg(&to).arg(PAGE);
            let value: Value = shared.pool.run("list_dead_letters", &keys.dead, |conn| call.invoke(conn))?;
            dead_page(value).map_err(|error| shared.malformed("list_dead_letters", &error))
        };
        let select = |value: Option<Vec<u8>>| {
            // `None`: deleted between the index and the letter.
            let Some(value) = value else { return Ok(None) };
            let letter =
                dead_letter(&value).map_err(|error| shared.malformed("list_dead_letters", &error))?;
            Ok(filter.matches(&letter).then_some(letter))
        };
        scan_pages(lex_from(filter.start_time), filter.offset, filter.limit, page, select)
    }

    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("get_dead_letter")?;
        let keys = &shared.keys;
        let value: Option<Vec<u8>> = shared.pool.run("get_dead_letter", &keys.dead, |conn| {
            redis::cmd("HGET").arg(&keys.dead).arg(id.to_string()).query(conn)
        })?;
        value
            .map(|value| dead_letter(&value).map_err(|error| shared.malformed("get_dead_letter", &error)))
            .transpose()
    }

    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("delete_dead_letter")?;
        let keys = &shared.keys;
        let mut call = Call::new(&shared.scripts.dead_delete, &[&keys.dead, &keys.dead_order]);
        call.arg(id);
        let deleted: i64 = shared.pool.run("delete_dead_letter", &keys.dead, |conn| call.invoke(conn))?;
        Ok(deleted == 1)
    }

    fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let shared = &*self.shared;
        shared.check_open("stats")?;
        let keys = &shared.keys;
        // Each call purges part of what expired; the counts are read once nothing more is due.
        let mut round = 0;
        let (counts, stream_length, dead_letters) = loop {
            let mut call = Call::new(
                &shared.scripts.stats,
                &[&keys.stream, &keys.counts, &keys.time, &keys.expiry, &keys.pending, &keys.dead],
            );
            call.arg(&keys.status).arg(STATS_PURGE);
            let value: Value = shared.pool.run("stats", &keys.counts, |conn| call.invoke(conn))?;
            let (counts, stream_length, dead_letters, more) =
                stats_reply(value).map_err(|error| shared.malformed("stats", &error))?;
            round += 1;
            if !more || round == STATS_PURGE_ROUNDS {
                break (counts, stream_length, dead_letters);
            }
        };
        let count = |name: &str| counts.get(name).copied().unwrap_or(0);
        let c = &shared.counters;
        let mut specific = BTreeMap::new();
        let mut put = |name: &str, value: serde_json::Value| {
            specific.insert(name.to_owned(), value);
        };
        put("key_prefix", shared.config.key_prefix.clone().into());
        put("stream", keys.stream.clone().into());
        put("stream_length", stream_length.into());
        put("max_len", shared.config.max_len.into());
        for name in ["trimmed", "expired", "replaced", "dead_letters_dropped"] {
            put(name, count(name).into());
        }
        put("reconnects", Counters::get(&shared.pool.reconnects).into());
        put("inbound_redelivered", Counters::get(&c.redelivered).into());
        put("inbound_echoes_skipped", Counters::get(&c.echoes_skipped).into());
        put("inbound_filtered", Counters::get(&c.filtered).into());
        put("inbound_lost", Counters::get(&c.lost).into());
        put("inbound_malformed", Counters::get(&c.malformed).into());
        Ok(ProviderStats {
            provider_type: NAME.to_owned(),
            total_events: count("total"),
            pending_events: count("pending"),
            processing_events: count("processing"),
            completed_events: count("completed"),
            failed_events: count("failed"),
            events_published: Counters::get(&c.published),
            events_consumed: Counters::get(&c.consumed),
            active_subscribers: Counters::get(&c.open_sources),
            dead_letters,
            provider_specific: specific,
        })
    }
}

impl Provider for RedisProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            inbound: true,
            work_queue: true,
            filter_at_source: false,
            list: true,
            delete: true,
            replay: true,
            durable: true,
            // Every write is a round trip to the server: it goes through the writer, batched.
            inline_writes: false,
        }
    }

    fn open_inbound(&self, config: &InboundConfig) -> Result<Arc<dyn Inbound>, ProviderError> {
        self.shared.check_open("open_inbound")?;
        Ok(Arc::new(inbound::RedisInbound::open(Arc::clone(&self.shared), config)?))
    }

    /// `redis <host>:<port> db <n>, stream <prefix>:<stream>`, the address as the URL names it.
    fn group_namespace(&self) -> GroupNamespace {
        self.shared.namespace.clone()
    }

    fn delete_group(&self, group: &ConsumerGroup) -> Result<bool, ProviderError> {
        const OPERATION: &str = "delete_group";
        self.shared.check_open(OPERATION)?;
        let group = group.key();
        keys::validate_member_name("consumer group", &group)?;
        let stream = &self.shared.keys.stream;
        // The group and its pending entries list are one Redis object on the stream.
        self.shared.pool.run(OPERATION, &group, |conn| {
            let exists: bool = redis::cmd("EXISTS").arg(stream).query(conn)?;
            if !exists {
                return Ok(false);
            }
            let destroyed: i64 = redis::cmd("XGROUP").arg("DESTROY").arg(stream).arg(&group).query(conn)?;
            redis::cmd("DEL").arg(self.shared.keys.naks_of(&group)).exec(conn)?;
            redis::cmd("HDEL").arg(self.shared.keys.group_lost()).arg(&group).exec(conn)?;
            Ok(destroyed > 0)
        })
    }

    fn close(&self) -> Result<(), ProviderError> {
        // Release: pairs with the Acquire in `check_open`.
        if !self.shared.closed.swap(true, Ordering::Release) {
            self.shared.pool.clear();
        }
        Ok(())
    }
}

/// Reads an index in pages of `PAGE` keys from `from` on (`page(from)` returns a page's keys and
/// its raw items), turns each item into a kept value or `None` with `select`, skips the first
/// `offset` kept and returns up to `limit`: the offset and limit of `list` and
/// `list_dead_letters`. Items past the limit are never selected.
fn scan_pages<R, T>(
    mut from: String,
    offset: usize,
    limit: Option<usize>,
    mut page: impl FnMut(&str) -> Result<(Vec<String>, Vec<R>), ProviderError>,
    mut select: impl FnMut(R) -> Result<Option<T>, ProviderError>,
) -> Result<Vec<T>, ProviderError> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    let mut skip = offset;
    while out.len() < limit {
        let (index_keys, items) = page(&from)?;
        for item in items {
            let Some(kept) = select(item)? else { continue };
            if skip > 0 {
                skip -= 1;
                continue;
            }
            out.push(kept);
            if out.len() == limit {
                return Ok(out);
            }
        }
        match index_keys.last() {
            Some(last) if index_keys.len() == PAGE => from = format!("({last}"),
            _ => break,
        }
    }
    Ok(out)
}

/// `{time keys, records}` from the list script.
fn list_page(value: Value) -> Result<(Vec<String>, Vec<Value>), Malformed> {
    let mut parts =
        reply::array(value).ok_or_else(|| Malformed::new("a list page is not an array"))?.into_iter();
    let time_keys = parts
        .next()
        .and_then(reply::array)
        .and_then(|keys| keys.into_iter().map(reply::string).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Malformed::new("a list page has no time keys"))?;
    let records = parts.next().and_then(reply::array).unwrap_or_default();
    Ok((time_keys, records))
}

/// One `{entry id, fields, status hash}` of the replay script: the entry id (for paging) and, when
/// the entry holds a live event of ours, its sequence number and the stored event (`None` for an
/// entry whose event expired, or one written by something else).
fn replay_item(item: Value) -> Result<(String, Option<(u64, Event)>), Malformed> {
    let mut parts =
        reply::array(item).ok_or_else(|| Malformed::new("a replay item is not an array"))?.into_iter();
    let entry_id =
        parts.next().and_then(reply::string).ok_or_else(|| Malformed::new("a replay item has no id"))?;
    let mut entry =
        Entry { id: entry_id.clone(), fields: parts.next().and_then(reply::pairs).unwrap_or_default() };
    let hash = parts.next().and_then(StatusHash::decode).unwrap_or_default();
    if !hash.is_record_of(&entry_id) {
        return Ok((entry_id, None));
    }
    let seq = seq_of_entry(&entry_id)
        .ok_or_else(|| Malformed::new(format!("entry id {entry_id} does not map to a sequence number")))?;
    let event = hash
        .into_event(entry.take_field("event"))
        .map_err(|reason| Malformed::new(format!("entry {entry_id}: {reason}")))?;
    Ok((entry_id, Some((seq, event))))
}

/// A page of dead letters: their order keys, and their stored values (`None` for one deleted
/// between the index and the read).
type DeadPage = (Vec<String>, Vec<Option<Vec<u8>>>);

/// `{order keys, values}` from the dead-letter page script.
fn dead_page(value: Value) -> Result<DeadPage, Malformed> {
    let mut parts =
        reply::array(value).ok_or_else(|| Malformed::new("a dead-letter page is not an array"))?.into_iter();
    let order_keys = parts
        .next()
        .and_then(reply::array)
        .and_then(|keys| keys.into_iter().map(reply::string).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Malformed::new("a dead-letter page has no order keys"))?;
    let values =
        parts.next().and_then(reply::array).unwrap_or_default().into_iter().map(reply::bytes).collect();
    Ok((order_keys, values))
}

/// A stored dead letter: `<order key> <JSON>`.
fn dead_letter(value: &[u8]) -> Result<DeadLetter, Malformed> {
    let at = value
        .iter()
        .position(|&b| b == b' ')
        .ok_or_else(|| Malformed::new("a dead letter has no order key"))?;
    serde_json::from_slice(&value[at + 1..])
        .map_err(|error| Malformed::new(format!("a dead letter: {error}")))
}

/// What the stats script returns: counters, stream length, dead letters, and whether more expired
/// events may be due for purging.
type StatsReply = (BTreeMap<String, u64>, u64, u64, bool);

/// `{counts, stream length, dead letters, more}` from the stats script.
fn stats_reply(value: Value) -> Result<StatsReply, Malformed> {
    let mut parts = reply::array(value).ok_or_else(|| Malformed::new("stats are not an array"))?.into_iter();
    let counts = parts
        .next()
        .and_then(reply::pairs)
        .ok_or_else(|| Malformed::new("stats have no counters"))?
        .into_iter()
        .map(|(name, n)| {
            let n = std::str::from_utf8(&n).ok().and_then(|n| n.parse::<i64>().ok()).unwrap_or(0);
            (String::from_utf8_lossy(&name).into_owned(), u64::try_from(n).unwrap_or(0))
        })
        .collect();
    let mut number =
        || parts.next().as_ref().and_then(reply::int).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
    let stream_length = number();
    let dead_letters = number();
    let more = number() == 1;
    Ok((counts, stream_length, dead_letters, more))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::assert_hidden;

    #[test]
    fn debug_hides_every_form_of_credentials() {
        for url in ["redis://app:s3cret@cache:6379/0", "rediss://s3cret@cache", "app:s3cret@cache:6379"] {
            let shown = format!("{:?}", RedisConfig::new(url));
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("cache") && shown.contains("client_name"), "{shown}");
        }
    }

    /// Neither a URL Redis refuses nor a server that cannot be reached puts the password in the
    /// error (no server is needed: nothing listens on port 1).
    #[test]
    fn connect_errors_keep_the_password_out() {
        let error = RedisProvider::connect(RedisConfig::new("redis://app:s3cret@127.0.0.1:port/0"))
            .expect_err("bad URL");
        assert_hidden(&error, "s3cret");
        for url in ["redis://app:s3cret@127.0.0.1:1/0", "redis://s3cret@127.0.0.1:1/0"] {
            let config = RedisConfig { timeout: Duration::from_millis(200), ..RedisConfig::new(url) };
            let provider = RedisProvider::connect(config).expect("connects on first use");
            assert_hidden(&provider.ping().expect_err("nothing listens"), "s3cret");
            assert!(!format!("{provider:?}").contains("s3cret"));
        }
    }
}
