//! The PostgreSQL provider (feature `postgres`): the events table is the source of truth, and the
//! instances sharing it receive each other's events through it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use eventbroker::{PostgresConfig, PostgresProvider};
//! use eventbroker::{Event, EventSink, EventSource, EventStore};
//!
//! let provider = PostgresProvider::connect(
//!     PostgresConfig::new("host=127.0.0.1 user=postgres dbname=app").with_schema("broker"),
//! )?;
//! let event = Arc::new(Event::new(EventSource::System, "system.health.check"));
//! provider.store_batch(&[Arc::clone(&event)], None)?;
//! assert_eq!(provider.get(event.id)?.map(|e| e.id), Some(event.id));
//! # Ok::<(), eventbroker::ProviderError>(())
//! ```
//!
//! ## Server version
//! PostgreSQL 14 or later: the inbound horizon reads `pg_current_xact_id` and `pg_snapshot`
//! (13), and CRUD capture installs with `CREATE OR REPLACE TRIGGER` (14). Connecting to an older
//! server fails at once with [`Backend`](crate::ProviderErrorKind::Backend), naming the version
//! found and the one needed. Tested on 15.
//!
//! ## Layout
//! [`PostgresProvider::connect`] creates the schema and tables when missing, by a versioned
//! migration (`<table>_migrations` records each step; concurrent first connections serialise on an
//! advisory lock). The events table holds the seed's columns plus:
//!
//! | column | what |
//! |---|---|
//! | `seq bigserial` | the store order: `replay` reads by it, ack tokens are it |
//! | `tx bigint` | the writing transaction: the inbound cursor is `(tx, seq)` (see below) |
//! | `origin text` | the consumer group that published the event (no echo); `NULL` for others |
//! | `created_at_ns`, `processed_at_ns`, `completed_at_ns` | nanoseconds since the Unix epoch (`timestamptz` keeps microseconds; the round trip keeps all nine digits; years 1677–2262) |
//! | `payload json`, `metadata json` | the text byte for byte (`json`, unlike `jsonb`, keeps it) |
//!
//! Indexes: `id` (unique), `(tx, seq)` for delivery, `(created_at_ns, id)` for `list` order, time
//! windows and retention, and `type` for type patterns with a literal prefix. The other `list`
//! filters narrow what those find: every index slows every `COPY` (each of these costs about a
//! tenth of the write rate), and `status` changes twice in every event's life, so indexing it
//! would also make every status update rewrite every index.
//! Schema, table and channel names are validated identifiers (letters, digits, `_`): anything
//! else, `events; drop table x` included, is refused with
//! [`InvalidInput`](crate::ProviderErrorKind::InvalidInput). Every value is a bound parameter.
//!
//! ## Writes
//! A batch is one transaction: binary `COPY` straight into the table, one `pg_notify` carrying the
//! batch's highest `seq` (never the event: a notification holds 8 000 bytes, and every `NOTIFY`
//! serialises commits), commit. An id already stored makes the `COPY` fail; the batch then goes
//! through a staging table and `INSERT … ON CONFLICT (id) DO UPDATE`, which keeps the row's `seq`
//! and origin: a batch retried after a lost commit reply duplicates nothing and is not delivered
//! again. Status updates are one `UPDATE … FROM unnest(…)` per batch. See the `sink` module.
//! PostgreSQL text cannot hold the NUL character: one in a text field (an error message, a session
//! id) is stored as U+FFFD, where refusing it would fail every other write of its batch.
//!
//! ## Delivery across instances
//! Each provider holds one extra connection that `LISTEN`s on the channel and wakes its inbound
//! sources; the sources also poll every [`PostgresConfig::poll_interval`] (250 ms), so nothing is
//! lost while the listener reconnects (with backoff, 50 ms doubling to 2 s). Consumer groups keep
//! their cursor in `<table>_groups` and their unacknowledged events in `<table>_claims`, so a
//! fan-out instance restarted under the same id resumes where it stopped, and members of a shared
//! group take what falls due with `FOR UPDATE SKIP LOCKED` and new events in turns on the group's
//! row. Ack tokens are `seq`s; cursors never derive from ids.
//!
//! The cursor is `(tx, seq)`, read only below the oldest running transaction: concurrent
//! transactions commit out of `seq` order, and a cursor on `seq` alone would skip a lower `seq`
//! that commits late. The inbound module documents the technique and where a new group starts.
//!
//! ## Beyond the broker
//! - **CRUD capture**: [`PostgresProvider::install_crud_capture`] makes every `INSERT`, `UPDATE`
//!   and `DELETE` on a table, by any client, an event `<schema>.<table>.create|update|delete`.
//!   The trigger belongs to the table, not to its name: a table dropped and created again (a
//!   migration) is no longer captured, a renamed one still is, under its old name, until capture
//!   is installed again; [`PostgresProvider::crud_capture_status`] says which.
//! - **Transactional outbox**: [`Outbox::publish`] stores events in the caller's own
//!   transaction; they exist, and are delivered, if and only if it commits.
//!   [`Outbox::publish_blocking`] does the same through the blocking `postgres` client.
//! - **Retention**: completed and failed events older than [`PostgresConfig::max_age`] (24 h)
//!   are deleted every [`PostgresConfig::cleanup_interval`] (1 min) in statements of at most
//!   [`PostgresConfig::cleanup_batch`] (5 000) rows.
//!
//! ## Stats
//! [`EventStore::stats`] reads no more of a table than 10 MiB, however large it grows (a metrics
//! reporter may call it every few seconds): the counts per status, and their total, are exact on
//! an events table of at most 10 MiB (1 280 blocks of 8 KiB; some 30 000 events of a few hundred
//! bytes) and estimated beyond, from a `TABLESAMPLE SYSTEM` sample of about 1 280 of its blocks,
//! each count scaled up by the share sampled (off by about 3 % when each status spreads over many
//! blocks); the dead letters alike. `provider_specific` says which: `event_counts_exact` and
//! `dead_letters_exact`. An exact count would read every row, as the status has no index (see
//! Layout). The activity counts (`events_published`, `query_malformed`, …) are this handle's
//! own counters, always exact.
//!
//! ## Threads, bounds and failures
//! The provider owns a tokio runtime with [`PostgresConfig::runtime_threads`] (1) worker thread,
//! `eventbroker-postgres`, and a pool of up to [`PostgresConfig::pool_size`] (4) connections. Every
//! call is bounded by [`PostgresConfig::operation_timeout`] (10 s; a fetch by its wait plus that),
//! enforced on both sides: the call returns and the server cancels the statement; the server also
//! ends a provider session left idle inside a transaction that long, so a provider stalled
//! mid-transaction releases its locks. A connection an operation leaves mid-way (an error, a
//! timeout) is closed, never reused. While the server is unreachable calls fail with
//! [`Unavailable`](crate::ProviderErrorKind::Unavailable) (the transient kind the broker's writer
//! retries), reconnection attempts backing off from 50 ms to 2 s. Errors name the table and carry
//! PostgreSQL's SQLSTATE.
//!
//! ## Measured
//! `cargo bench --features postgres --bench provider_postgres`, PostgreSQL 15 on the same 2-vCPU
//! machine, which other builds kept busy (load average 8 to 11, so compare within the run):
//!
//! | write | events/s |
//! |---|---:|
//! | `store_batch` of 10 000 (binary `COPY`) | 34 000 |
//! | the same into a table without the secondary indexes | 58 000 |
//! | `store_batch` of 1 000 | 18 000 |
//! | `store_batch` of 100 (`COPY`) | 9 400 |
//! | `store_batch` of 1 (one pipelined `INSERT`, with its `pg_notify`) | 184 |
//! | baseline: one autocommit `INSERT` per event, plain client | 404 |
//!
//! Batching gains 180× over storing events one at a time, and 80× over the autocommit baseline;
//! one event costs a commit (an fsync) whatever is done around it.
//!
//! ## Replay and concurrent writers
//! [`EventStore::replay`] returns what is committed, in `seq` order, and never steps over an
//! event that commits later: a call reads no further than the highest `seq` below which no
//! transaction can still commit a row. It finds that by waiting for the transactions that were
//! writing the table when it began, up to 1 s (or half the operation timeout); one still open then
//! holds the replay back: the call fails with [`ProviderErrorKind::Unavailable`](crate::ProviderErrorKind::Unavailable)
//! naming it, and a call from the same position once it ends reads what it committed
//! ([`Broker::replay`](crate::Broker::replay) stops with
//! [`BrokerError::ReplayInterrupted`](crate::BrokerError::ReplayInterrupted) and where to resume).
//! Paging on from [`ReplayPage::next`] therefore misses nothing, and neither does a
//! [`ReplayCursor`](crate::ReplayCursor) or
//! [`ReplayReport::resume_from`](crate::ReplayReport::resume_from). The store module documents
//! why the inbound source's horizon does not serve here.
//!
//! ## Replay past rows that hold no valid event
//! A row no event can be read from (a captured row whose JSON breaks the payload rules, a status
//! or source written by hand) is passed over, counted in the stats' `query_malformed` and logged
//! once per call with its `seq` range. A call passes over at most 5 000 such rows, and starts no
//! read once three quarters of the operation timeout are gone (each read is at most 500 rows past
//! the page); it then returns the events it has, possibly none, with [`ReplayPage::end`] false and
//! [`ReplayPage::next`] past the last row it read. So a run of any length takes calls that each
//! return within the timeout and each move on, where one call reading on until its page was full
//! timed out at the same place every time. On a loaded 2-core machine a call passes over about
//! 5 000 small rows in 35 ms.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use parking_lot::Mutex;

use self::backend::Backend;
use self::inbound::InboundSql;
use self::listener::ListenerStats;
use self::retention::RetentionSql;
use self::sink::SinkSql;
use self::store::StoreSql;
use super::{
    Capabilities, ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter, EventSink,
    EventStore, GroupNamespace, Inbound, InboundConfig, Provider, ProviderStats, ReplayFrom, ReplayPage,
    StatusUpdate, closed_error,
};
use crate::error::ProviderError;
use crate::event::{Event, EventId, EventStatus};
use crate::pattern::Pattern;
use crate::sync::{AtomicBool, AtomicU64, Ordering};

mod backend;
mod capture;
mod codec;
mod config;
mod ident;
mod inbound;
mod listener;
mod migrate;
mod outbox;
mod retention;
mod schema;
mod sink;
mod store;

pub use self::capture::CaptureStatus;
pub use self::config::PostgresConfig;
pub use self::outbox::Outbox;
/// The blocking client over that tokio-postgres, for [`Outbox::publish_blocking`]'s transactions.
pub use postgres;
/// The tokio-postgres this provider is built on, for [`Outbox::publish`]'s transactions.
pub use tokio_postgres;

const NAME: &str = "postgres";

/// The PostgreSQL [`Provider`]; see the [module docs](self) for the layout and guarantees.
///
/// Each `PostgresProvider` is one client of the server, with its own runtime, pool and listener:
/// brokers in one process may share one (an `Arc`), and brokers in different processes each
/// connect their own, exactly alike. Dropping it closes it.
///
/// ```no_run
/// use std::sync::Arc;
/// use eventbroker::{PostgresConfig, PostgresProvider};
/// use eventbroker::{Broker, ConsumerGroup, InboundConfig, Provider};
///
/// let config = PostgresConfig::new("host=127.0.0.1 user=postgres dbname=app");
/// let provider = Arc::new(PostgresProvider::connect(config)?);
/// let broker = Broker::builder().instance_id("api-1").provider(provider.clone()).build()?;
///
/// // What another process sharing the tables would do to receive this one's events:
/// let source = provider.open_inbound(&InboundConfig::new("api-2", ConsumerGroup::Instance("api-2".into())))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PostgresProvider {
    shared: Arc<Shared>,
}

/// What the provider, its inbound sources and its background tasks share.
struct Shared {
    backend: Backend,
    sink_sql: SinkSql,
    store_sql: StoreSql,
    inbound_sql: InboundSql,
    retention_sql: RetentionSql,
    listener: Arc<ListenerStats>,
    listener_started: AtomicBool,
    /// Events this handle stored for the first time, re-stores, and events retention deleted.
    published: AtomicU64,
    /// Events this handle's inbound sources handed out (redeliveries included), and the sources
    /// open now.
    consumed: AtomicU64,
    open_sources: AtomicU64,
    replaced: AtomicU64,
    expired: AtomicU64,
    /// Rows inbound sources passed over because they hold no valid event.
    malformed: AtomicU64,
    /// Rows `list` and `replay` passed over because they hold no valid event.
    query_malformed: AtomicU64,
    /// Serialises starting the background tasks with closing.
    lifecycle: Mutex<()>,
}

impl PostgresProvider {
    /// Validates `config`, starts the runtime, connects and migrates the schema to the current
    /// version, and starts the retention task. A schema already at the current version is only
    /// read, so a role with no more than data rights on its tables (`SELECT`, `INSERT`, `UPDATE`,
    /// `DELETE`, and its sequences) connects once a role that may create has migrated it.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use eventbroker::{PostgresConfig, PostgresProvider};
    ///
    /// let provider = PostgresProvider::connect(PostgresConfig {
    ///     pool_size: 8,
    ///     operation_timeout: Duration::from_secs(5),
    ///     ..PostgresConfig::new("postgresql://app:secret@127.0.0.1:5432/app").with_schema("broker")
    /// })?;
    /// assert_eq!(provider.config().schema, "broker");
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    ///
    /// # Errors
    /// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput) for a name that is not an
    /// identifier, an unparsable URL or a zero timeout;
    /// [`Unavailable`](crate::ProviderErrorKind::Unavailable) when the server cannot be reached;
    /// [`Backend`](crate::ProviderErrorKind::Backend) when the server is older than PostgreSQL 14
    /// (the message names both versions) or the migration fails.
    pub fn connect(config: PostgresConfig) -> Result<Self, ProviderError> {
        let names = config.validate()?;
        let backend = Backend::start(names.clone(), config)?;
        migrate::migrate(&backend)?;
        let shared = Arc::new(Shared {
            sink_sql: SinkSql::new(&names),
            store_sql: StoreSql::new(&names),
            inbound_sql: InboundSql::new(&names),
            retention_sql: RetentionSql::new(&names),
            backend,
            listener: Arc::default(),
            listener_started: AtomicBool::new(false),
            published: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            open_sources: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            query_malformed: AtomicU64::new(0),
            lifecycle: Mutex::new(()),
        });
        let config = &shared.backend.config;
        if let (Some(_), Some(interval)) = (config.max_age, config.cleanup_interval) {
            shared.backend.spawn(retention::run_periodically(Arc::downgrade(&shared), interval));
        }
        Ok(Self { shared })
    }

    /// The settings in use.
    pub fn config(&self) -> &PostgresConfig {
        &self.shared.backend.config
    }

    /// An [`Outbox`] writing to this provider's tables.
    ///
    /// ```no_run
    /// # use eventbroker::{PostgresConfig, PostgresProvider};
    /// let provider = PostgresProvider::connect(PostgresConfig::default())?;
    /// let outbox = provider.outbox();
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    pub fn outbox(&self) -> Outbox {
        Outbox::from_names(&self.shared.backend.names)
    }

    /// Installs the CRUD capture trigger on `table` (`name` or `schema.name`; `public` when no
    /// schema is given; names are case-sensitive identifiers): from now on every `INSERT`,
    /// `UPDATE` and `DELETE` on it, by any client, stores an event
    /// `<schema>.<table>.create|update|delete` with the row as its payload (`{"old": …, "new": …}`
    /// for updates) in the same transaction. Installing again replaces the trigger, and leaves one
    /// already in place as it would create it alone, so that calling this at every start of a
    /// service takes no lock on a busy table, and puts capture back on a table a migration dropped
    /// and created again, or renamed (see [`crud_capture_status`](Self::crud_capture_status) for
    /// what capture follows, and how to find a table whose capture was lost); instances
    /// installing at once (a service's replicas starting together) take turns. Creating or removing a trigger locks the table against its
    /// writers, which queue behind the lock while it waits: it waits 1 s at most for a writer's
    /// open transaction, then fails as transient, to be tried again.
    ///
    /// What a captured event holds: source `database`, the schema, table and operation, the row
    /// (the new one for `INSERT`, the old one for `DELETE`, both for `UPDATE`, even one that
    /// changed nothing), a UUID v7 id; no user, session, instance or metadata, as the database
    /// knows none of them. `TRUNCATE` is not captured. Delivery is as for any event: a broker's
    /// group sees the changes made from when it first existed on. No broker published it, so the
    /// broker that handles it writes its statuses (`processing`, then `completed` or `failed`),
    /// and retention removes it once finished.
    ///
    /// The trigger writes the provider's tables with the rights of the role that installed it (a
    /// `SECURITY DEFINER` function no other role may call directly), so a client that may write
    /// the captured table needs no rights on the provider's schema. On a partitioned table the
    /// events name the partitioned table; an `UPDATE` that moves a row to another partition is,
    /// to PostgreSQL and so to capture, a `delete` and a `create`. Providers of different schemas
    /// may capture one table side by side, each with its own trigger. A row whose JSON breaks the
    /// payload rules (a number beyond an `f64`, a lone surrogate escape, nesting past the depth
    /// limit) cannot become an event: inbound sources pass over it, log it, count it in the
    /// provider's stats (`inbound_malformed`) and mark it `failed` with the reason, so retention
    /// removes it in time; `list` and `replay` pass over it too (counted as `query_malformed`; a
    /// `list` page may then hold fewer events than its limit, a replay page too, but then says
    /// where the next one starts: see [`ReplayPage`]), and `get`
    /// of its id returns an error naming what is wrong with it.
    ///
    /// ```no_run
    /// # use eventbroker::{PostgresConfig, PostgresProvider};
    /// let provider = PostgresProvider::connect(PostgresConfig::default())?;
    /// provider.install_crud_capture("public.users")?;
    /// // `INSERT INTO users …` from psql now delivers `public.users.create` to every broker.
    /// assert!(provider.remove_crud_capture("public.users")?);
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    ///
    /// # Errors
    /// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput) for a name that is not an
    /// identifier or names one of the provider's own tables;
    /// [`Unavailable`](crate::ProviderErrorKind::Unavailable) when a transaction writing the table
    /// held its lock for longer than 1 s; a backend error when the table does not exist.
    pub fn install_crud_capture(&self, table: &str) -> Result<(), ProviderError> {
        capture::install(&self.shared, table)
    }

    /// Whether changes to `table` (as [`install_crud_capture`](Self::install_crud_capture) names
    /// it) are being captured now, and if not, why: capture belongs to the table, not its name,
    /// and PostgreSQL tells no one when a migration drops the table (and its trigger with it) and
    /// creates it again, or renames it. One catalog query, no lock on the table.
    ///
    /// | what happened to the table | status | its changes |
    /// |---|---|---|
    /// | nothing since install | [`Capturing`](CaptureStatus::Capturing) | captured |
    /// | dropped and created again | [`NotInstalled`](CaptureStatus::NotInstalled) | not captured until installed again |
    /// | dropped | [`NoTable`](CaptureStatus::NoTable) | — |
    /// | renamed, or moved to another schema | [`Renamed { now }`](CaptureStatus::Renamed) | captured, named after the old name, until installed under `now` |
    /// | trigger disabled or changed by hand | [`Altered`](CaptureStatus::Altered) | as the trigger now says |
    ///
    /// ```no_run
    /// # use eventbroker::{PostgresConfig, PostgresProvider};
    /// use eventbroker::provider::postgres::CaptureStatus;
    ///
    /// let provider = PostgresProvider::connect(PostgresConfig::default())?;
    /// provider.install_crud_capture("public.users")?;
    /// // Later, say from a health check:
    /// match provider.crud_capture_status("public.users")? {
    ///     CaptureStatus::Capturing => {}
    ///     lost => eprintln!("changes to public.users are not captured as installed: {lost:?}"),
    /// }
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    ///
    /// # Errors
    /// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput) for a name that is not an
    /// identifier or names one of the provider's own tables; a backend failure otherwise.
    pub fn crud_capture_status(&self, table: &str) -> Result<CaptureStatus, ProviderError> {
        capture::status(&self.shared, table)
    }

    /// Removes the CRUD capture trigger from `table`, and from a table renamed from it that still
    /// captures under its name; `true` when there was one, `false` when there was none (a table
    /// that does not exist included).
    ///
    /// # Errors
    /// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput) for a name that is not an
    /// identifier or names one of the provider's own tables;
    /// [`Unavailable`](crate::ProviderErrorKind::Unavailable) when a transaction writing the table
    /// held its lock for longer than 1 s; a backend failure otherwise.
    pub fn remove_crud_capture(&self, table: &str) -> Result<bool, ProviderError> {
        capture::remove(&self.shared, table)
    }

    /// Deletes completed and failed events older than [`PostgresConfig::max_age`] now, rather
    /// than at the next cleanup interval; returns how many were deleted (0 without a `max_age`).
    ///
    /// The call is bounded by one [`PostgresConfig::operation_timeout`] (10 s) as a whole: it
    /// starts deletes (of [`PostgresConfig::cleanup_batch`] rows each) during the first half of
    /// it, so a large backlog may take more than one call, or the next interval, to clear.
    ///
    /// ```no_run
    /// # use eventbroker::{PostgresConfig, PostgresProvider};
    /// let provider = PostgresProvider::connect(PostgresConfig { cleanup_interval: None, ..PostgresConfig::default() })?;
    /// let deleted = provider.cleanup_now()?;
    /// println!("deleted {deleted} finished events older than a day");
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    ///
    /// # Errors
    /// [`Closed`](crate::ProviderErrorKind::Closed) after `close`;
    /// [`Unavailable`](crate::ProviderErrorKind::Unavailable) when a delete has not ended by the
    /// end of the operation timeout (its message counts what the call deleted before); a backend
    /// failure otherwise.
    pub fn cleanup_now(&self) -> Result<u64, ProviderError> {
        const OP: &str = "cleanup_now";
        let backend = &self.shared.backend;
        let (started, limit) = (std::time::Instant::now(), backend.config.operation_timeout);
        // The run's deadline comes first, so its error, which counts what it deleted, is the one
        // returned when the two would fire together.
        backend.run(OP, limit, retention::cleanup(&self.shared, Timestamp::now(), OP, started, limit))
    }
}

impl Shared {
    /// Starts the listener the first time an inbound source is opened.
    fn start_listener(&self) {
        let _lifecycle = self.lifecycle.lock();
        // Relaxed: read and written under `lifecycle`.
        if self.backend.is_closed() || self.listener_started.swap(true, Ordering::Relaxed) {
            return;
        }
        self.backend.spawn(listener::listen(
            self.backend.pg_config.clone(),
            self.backend.names.channel.clone(),
            self.backend.config.connect_timeout,
            self.backend.wake_sender(),
            Arc::clone(&self.listener),
        ));
    }
}

impl Drop for PostgresProvider {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl std::fmt::Debug for PostgresProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresProvider")
            .field("table", &self.shared.backend.names.events())
            .field("channel", &self.shared.backend.names.channel.as_str())
            .field("closed", &self.shared.backend.is_closed())
            .finish_non_exhaustive()
    }
}

impl EventSink for PostgresProvider {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        let shared = &self.shared;
        if events.is_empty() {
            return shared.backend.call("store_batch", async { Ok(()) });
        }
        let stored = sink::store_batch(&shared.backend, &shared.sink_sql, events, origin)?;
        // Relaxed: counters, read for stats only.
        shared.published.fetch_add(stored.inserted, Ordering::Relaxed);
        shared.replaced.fetch_add(stored.replaced, Ordering::Relaxed);
        Ok(())
    }

    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        if updates.is_empty() {
            return self.shared.backend.call("update_status_batch", async { Ok(()) });
        }
        sink::update_status_batch(&self.shared.backend, &self.shared.sink_sql, updates)
    }

    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError> {
        if letters.is_empty() {
            return self.shared.backend.call("store_dead_letters", async { Ok(()) });
        }
        sink::store_dead_letters(&self.shared.backend, &self.shared.sink_sql, letters)
    }

    fn flush(&self) -> Result<(), ProviderError> {
        // Every write commits before it returns: nothing is buffered.
        self.shared.backend.call("flush", async { Ok(()) })
    }
}

impl EventStore for PostgresProvider {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        store::get(&self.shared.backend, &self.shared.store_sql, id)
    }

    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        store::list(&self.shared.backend, &self.shared.store_sql, filter, &self.shared.query_malformed)
    }

    fn delete(&self, id: EventId) -> Result<bool, ProviderError> {
        store::delete(&self.shared.backend, &self.shared.store_sql, id)
    }

    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<ReplayPage, ProviderError> {
        let shared = &self.shared;
        store::replay(&shared.backend, &shared.store_sql, from, pattern, limit, &shared.query_malformed)
    }

    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError> {
        store::list_dead_letters(&self.shared.backend, &self.shared.store_sql, filter)
    }

    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError> {
        store::get_dead_letter(&self.shared.backend, &self.shared.store_sql, id)
    }

    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError> {
        store::delete_dead_letter(&self.shared.backend, &self.shared.store_sql, id)
    }

    fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let shared = &self.shared;
        let counts = store::counts(&shared.backend, &shared.store_sql)?;
        let by_status = &counts.by_status;
        let count = |status| by_status.get(&status).copied().unwrap_or(0);
        let (pool_size, pool_idle) = shared.backend.pool_status();
        // Relaxed: counters, read for stats only.
        let read = |counter: &AtomicU64| serde_json::Value::from(counter.load(Ordering::Relaxed));
        let listener = &shared.listener;
        Ok(ProviderStats {
            provider_type: NAME.to_owned(),
            total_events: by_status.values().sum(),
            pending_events: count(EventStatus::Pending),
            processing_events: count(EventStatus::Processing),
            completed_events: count(EventStatus::Completed),
            failed_events: count(EventStatus::Failed),
            events_published: shared.published.load(Ordering::Relaxed),
            events_consumed: shared.consumed.load(Ordering::Relaxed),
            active_subscribers: shared.open_sources.load(Ordering::Relaxed),
            dead_letters: counts.dead_letters,
            provider_specific: BTreeMap::from([
                ("table".to_owned(), shared.backend.names.events().into()),
                ("event_counts_exact".to_owned(), counts.events_exact.into()),
                ("dead_letters_exact".to_owned(), counts.dead_letters_exact.into()),
                ("replaced".to_owned(), read(&shared.replaced)),
                ("expired".to_owned(), read(&shared.expired)),
                ("inbound_malformed".to_owned(), read(&shared.malformed)),
                ("query_malformed".to_owned(), read(&shared.query_malformed)),
                ("pool_size".to_owned(), pool_size.into()),
                ("pool_idle".to_owned(), pool_idle.into()),
                ("listener_sessions".to_owned(), read(&listener.sessions)),
                ("listener_failures".to_owned(), read(&listener.failures)),
                ("notifications".to_owned(), read(&listener.notifications)),
            ]),
        })
    }
}

/// The servers and database of `pg` (credentials left out) and the events table of `names`: the
/// groups' cursors and claims live in tables named after it, in that database.
fn group_namespace(pg: &tokio_postgres::Config, names: &schema::Names) -> GroupNamespace {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = if pg.get_hosts().is_empty() {
        pg.get_hostaddrs().iter().map(ToString::to_string).collect()
    } else {
        pg.get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(directory) => directory.display().to_string(),
            })
            .collect()
    };
    // One port for every host, or one each; 5432 when none is given.
    let port = |at: usize| match pg.get_ports() {
        [] => 5432,
        [port] => *port,
        ports => ports.get(at).copied().unwrap_or(5432),
    };
    let servers: Vec<String> =
        hosts.iter().enumerate().map(|(at, host)| format!("{host}:{}", port(at))).collect();
    // Without a database name, the server takes the user's.
    let database = pg.get_dbname().or(pg.get_user()).unwrap_or_default();
    GroupNamespace::new(NAME, format!("{} database {database}, table {}", servers.join(" "), names.events()))
}

impl Provider for PostgresProvider {
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
            durable: true,
            // Every write is a network round trip and a commit: it goes through the writer.
            inline_writes: false,
        }
    }

    fn open_inbound(&self, config: &InboundConfig) -> Result<Arc<dyn Inbound>, ProviderError> {
        if self.shared.backend.is_closed() {
            return Err(closed_error(NAME, "open_inbound"));
        }
        Ok(Arc::new(inbound::open(&self.shared, config)?))
    }

    fn delete_group(&self, group: &ConsumerGroup) -> Result<bool, ProviderError> {
        if self.shared.backend.is_closed() {
            return Err(closed_error(NAME, "delete_group"));
        }
        inbound::delete(&self.shared, group)
    }

    /// `postgres <host>:<port>… database <name>, table "<schema>"."<table>"`: the servers as the
    /// connection string names them.
    fn group_namespace(&self) -> GroupNamespace {
        group_namespace(&self.shared.backend.pg_config, &self.shared.backend.names)
    }

    fn close(&self) -> Result<(), ProviderError> {
        let _lifecycle = self.shared.lifecycle.lock();
        self.shared.backend.close();
        Ok(())
    }
}
