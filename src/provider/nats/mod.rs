//! The NATS JetStream provider (feature `nats`): events in a stream, statuses in a KV bucket, dead
//! letters in a stream of their own, and a durable pull consumer per consumer group.
//!
//! ## Layout
//! | what | where | one message per |
//! |---|---|---|
//! | events | stream `EVENTS`, subject `events.<type>` | event, written once, never changed |
//! | statuses | KV bucket `EVENTS_STATUS` (history 1), key = event id | event: `{seq, status, error, retry_count, processed_at, completed_at}` |
//! | dead letters | stream `EVENTS_DLQ`, subject `events_dlq.<letter id>`, one message per subject | dead letter |
//! | groups | durable consumers `eb-i-<instance>` / `eb-s-<group>` on `EVENTS` | — |
//!
//! (Names with the defaults; see [`NatsConfig`].) The subject is built from the event **type**
//! only, one token per segment, bytes outside `[A-Za-z0-9_-]` escaped as `%XX`
//! (`café.paid` → `events.caf%C3%A9.paid`); never from schema, entity or operation. An event
//! message's body is the event's JSON as stored, with headers `Nats-Msg-Id` and `Eventbroker-Id`
//! (the event id), `Eventbroker-Type`, `Eventbroker-Source`, `Eventbroker-Instance` and
//! `Eventbroker-Origin` (the publishing broker's group key). Status updates and deletes never
//! write to the event stream: they write the status bucket.
//!
//! The three streams are created on connect if missing, and brought to this configuration's
//! subjects, limits, replicas and duplicate window if they exist with others (settings the
//! provider does not manage are kept; a different storage type is refused).
//!
//! ## Writes
//! - **`store_batch`** is two pipelined rounds: every event is published at once (up to
//!   [`NatsConfig::max_in_flight`] unacknowledged), then every status record is created with a
//!   compare-and-set on "no record yet", again all at once. Each round waits once for all its
//!   acknowledgements. A batch of 1000 costs two round trips, not 2000.
//! - **Stored once.** `Nats-Msg-Id` is the event id, so the server drops a second publish of the id
//!   within its duplicate window ([`NatsConfig::duplicate_window`], 2 minutes by default) and
//!   answers with the first message's sequence: a batch retried after a lost acknowledgement
//!   stores nothing twice, and a second store of an id keeps its sequence and is not delivered
//!   again. Beyond the window the server would take it as new, so an id that may be older than the
//!   window (a UUID v7 made more than `duplicate_window − 30 s` ago, or any other UUID) has its
//!   record read first; a live record means a second store, which replaces the event in the record
//!   and publishes nothing. What is left uncovered: the same old id stored by two handles at the
//!   same moment, or by hosts whose clocks disagree by more than 30 s — then the second message is
//!   found when its record cannot be created, and deleted, and a consumer fetching in between (one
//!   round trip) may receive it; and a retry that comes more than the window after a store whose
//!   record was never written stores a second message (`list` still shows the event once).
//! - A **second store** of an id writes the new event into the record (`replaced_by`): the
//!   message in the stream stays as first stored, `get`, `list` and `replay` show the new one.
//!   The message also stays on the subject of the type it was first stored with, so a `replay`
//!   with a pattern finds an event stored again under another type only when the pattern matches
//!   both types (`list` finds it by its new type: it reads every record anyway).
//! - **`update_status_batch`**: one compare-and-set per event on the record's revision, all in
//!   one round. The revision comes from a cache of the last [`NatsConfig::status_cache`] records
//!   this handle wrote, or from a read; a lost compare-and-set re-reads and retries (5 rounds at
//!   most). An id with no record (never stored, deleted, expired) is skipped.
//! - **`delete`** removes the message and writes a delete marker over the record.
//!
//! ## Reads
//! | query | at the server | after fetching |
//! |---|---|---|
//! | `get` | the record (direct get by key), then the message (direct get by sequence) | — |
//! | `list` | the type pattern, as the scan's filter subject; the last record per id | source, status, user, schema, entity, operation, instance, time window; order, offset, limit |
//! | `replay` | start (sequence, or time less [`NatsConfig::replay_time_slack`]) and pattern | `created_at ≥ from` for a start by time; the page's records |
//! | dead letters | get and delete by id | every filter, the order, offset and limit |
//! | `stats` | stream message and byte counts | counts per status: one scan of the bucket |
//!
//! `list` and `stats` read every record and every (matching) message: they cost O(stored events)
//! and suit operations and tests, not a hot path. `replay` costs O(page). Sequence numbers are
//! stream sequences: they start at 1, increase in store order and have gaps (deleted messages,
//! and sequences the bucket's messages do not share but the stream skips for deleted ones).
//! A replay by time reads the stream from `from − replay_time_slack` by the server's store time
//! and keeps events created at or after `from`: an event whose `created_at` is more than the
//! slack later than its store time is not found that way (replay by sequence finds it).
//!
//! Messages another client published on `events.<type>` with the seed's JSON are delivered and
//! show up in `list` and `replay` as published; they have no record until stored through a
//! provider, so `get`, `update_status_batch` and `delete` do not see them.
//!
//! ## Across instances
//! See the `inbound` module: a durable pull consumer per group, deliver policy `new` for a group
//! seen for the first time, `ack_wait` = [`InboundConfig::claim_idle`], `+ACK` / `+TERM` (for
//! [`AckOutcome::DeadLettered`](crate::AckOutcome::DeadLettered)) / `-NAK {"delay":…}` / `+WPI`,
//! filter subjects from the patterns. A 2.9 server gives a consumer one filter subject: several
//! patterns are folded into the narrowest subject covering them all and checked exactly after
//! fetching (`filtered_after_fetch` counts what crossed the network for nothing); 2.10 and later
//! get one filter per pattern, overlapping ones joined.
//!
//! The group namespace ([`Provider::group_namespace`]) is the servers, the account and the event
//! stream: accounts on one server have separate JetStream namespaces, so two connections under
//! different accounts never share a consumer. The account is the one the server names on connect
//! (`account <name>`: servers from 2.10 on answer `$SYS.REQ.USER.INFO`); from an older server,
//! what the credentials tell, secrets left out: `user <name>`, `nkey <public key>` or
//! `credentials <path>` (a token or no credentials: nothing, the server has one account for
//! them). Told by credentials, two users of one account are two namespaces.
//!
//! ## Connection and failures
//! URL (several, comma-separated), user and password, token, `NKey` seed or credentials file, TLS
//! with custom roots and client certificates ([`NatsAuth`], [`NatsTls`]). Credentials in the URL
//! (`nats://user:password@host`, `nats://token@host`, percent-encoded) are taken out of it and
//! given to the client as [`NatsAuth`] would be, once for every server of the list (servers with
//! different ones, or URL credentials and [`NatsConfig::auth`] both, are refused): async-nats logs
//! each server it dials at debug level with its URL whole, and sends no URL's credentials. It still
//! logs its `CONNECT` message, password or token included, at trace level (target
//! `async_nats::connection`): keep that target at debug or below where logs are kept. The client
//! reconnects forever, 100 ms doubling to [`NatsConfig::reconnect_max_delay`]. Every call runs on
//! the provider's own runtime ([`NatsConfig::runtime_threads`] threads named `eventbroker-nats`)
//! and is bounded: a server that does not answer makes the call fail with
//! [`ProviderErrorKind::Unavailable`] after [`NatsConfig::request_timeout`] (a few of them for
//! calls of several rounds), never hang. While the server is down every call fails that way, the
//! broker's writer retries within its backlog, and local dispatch goes on. An event whose message
//! exceeds the server's `max_payload` (1 MiB by default) can never be stored: `store_batch` stores
//! the rest of its batch and fails with [`ProviderErrorKind::InvalidInput`]; the broker's writer
//! narrows the batch down (the server drops the re-stored messages as duplicates by their ids) and
//! gives up that event alone.
//!
//! ```no_run
//! use std::sync::Arc;
//! use eventbroker::{NatsConfig, NatsProvider};
//! use eventbroker::{Event, EventSink, EventSource, EventStore, Provider};
//!
//! let provider = NatsProvider::connect(NatsConfig::new("nats://127.0.0.1:4222"))?;
//! let event = Arc::new(Event::new(EventSource::System, "billing.invoice.paid"));
//! provider.store_batch(&[Arc::clone(&event)], None)?;
//! assert_eq!(provider.get(event.id)?.map(|e| e.id), Some(event.id));
//! provider.close()?;
//! # Ok::<(), eventbroker::ProviderError>(())
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use self::connection::{Connection, NAME};
use self::inbound::InboundCounters;
use self::layout::Layout;
use self::sink::WriteCounters;
use self::status::RevisionCache;
use super::{
    Capabilities, ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter, EventSink,
    EventStore, GroupNamespace, Inbound, InboundConfig, Provider, ProviderStats, ReplayFrom, ReplayPage,
    StatusUpdate, closed_error,
};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::event::{Event, EventId};
use crate::pattern::{Pattern, validate_event_type};

mod config;
mod connection;
mod inbound;
mod layout;
mod scan;
mod sink;
mod status;
mod store;
mod subject;
#[cfg(feature = "test-util")]
mod test_backend;
mod wire;

pub use self::config::{NatsAuth, NatsConfig, NatsStorage, NatsTls};
#[cfg(feature = "test-util")]
pub use self::test_backend::NatsBackend;

/// Round trips a call of several rounds may take before it is given up.
const ROUNDS: u32 = 4;

/// A [`Provider`] on NATS JetStream; see the [module docs](self).
///
/// Each `NatsProvider` has its own connection. Brokers of one process may share one provider (an
/// `Arc`), or each connect their own, as separate processes do.
pub struct NatsProvider {
    shared: Arc<Shared>,
}

/// What the provider's calls and its sources share.
struct Shared {
    conn: Connection,
    config: NatsConfig,
    /// The servers, the account and the event stream: where the durable consumers live.
    namespace: GroupNamespace,
    layout: Layout,
    closed: AtomicBool,
    cache: Mutex<RevisionCache>,
    writes: WriteCounters,
    inbound: InboundCounters,
}

impl NatsProvider {
    /// Connects, and creates or updates the streams and bucket of `config`'s layout.
    ///
    /// # Errors
    /// [`ProviderErrorKind::InvalidInput`] for an invalid configuration or a stream that exists
    /// with another storage type; [`ProviderErrorKind::Unavailable`] when the server cannot be
    /// reached within [`NatsConfig::connect_timeout`] (retrying may succeed);
    /// [`ProviderErrorKind::Backend`] for refused credentials, TLS failures and streams the
    /// server refuses to create.
    pub fn connect(config: NatsConfig) -> Result<Self, ProviderError> {
        config.validate().map_err(|error| {
            ProviderError::new(NAME, "connect", ProviderErrorKind::InvalidInput(error.to_string()))
        })?;
        let conn = Connection::open(&config)?;
        let client = conn.client.clone();
        // An old server does not answer (no responder, at once); one that does not answer in time
        // leaves the account to what the credentials say.
        let account = conn
            .call("connect", config.request_timeout, async move { Ok(connection::account(&client).await) })
            .ok()
            .flatten();
        let layout = Layout::new(&config);
        let shared = Arc::new(Shared {
            namespace: group_namespace(&config, account.as_deref()),
            cache: Mutex::new(RevisionCache::new(config.status_cache)),
            conn,
            config,
            layout,
            closed: AtomicBool::new(false),
            writes: WriteCounters::default(),
            inbound: InboundCounters::default(),
        });
        let setup = Arc::clone(&shared);
        let limit = shared.config.request_timeout.saturating_mul(3 * ROUNDS);
        let ensured = shared
            .conn
            .call("connect", limit, async move { setup.layout.ensure(&setup.conn.js, &setup.config).await });
        if let Err(error) = ensured {
            let _ = shared.conn.shutdown(shared.config.request_timeout);
            return Err(error);
        }
        Ok(Self { shared })
    }

    /// The settings in use.
    pub fn config(&self) -> &NatsConfig {
        &self.shared.config
    }

    /// The server's version, as it announced itself (`2.9.10`).
    pub fn server_version(&self) -> String {
        self.shared.conn.client.server_info().version
    }

    /// Deletes the three streams of this provider's layout — every event, status record, dead
    /// letter and consumer group in them — and closes the provider. For tearing down test and
    /// staging namespaces; other providers on the same layout fail from then on.
    ///
    /// ```no_run
    /// use eventbroker::{NatsConfig, NatsProvider};
    ///
    /// let scratch = NatsConfig { stream_name: "SCRATCH".into(), subject_prefix: "scratch".into(), ..NatsConfig::default() };
    /// NatsProvider::connect(scratch)?.destroy()?;
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    ///
    /// # Errors
    /// [`ProviderErrorKind::Unavailable`] when the server cannot be reached, or a refusal of the
    /// server; the provider is closed all the same.
    pub fn destroy(self) -> Result<(), ProviderError> {
        const OPERATION: &str = "destroy";
        let shared = Arc::clone(self.open(OPERATION)?);
        let deleted = self.run(OPERATION, async move {
            #[derive(serde::Deserialize)]
            struct Deleted {}
            let layout = &shared.layout;
            for stream in [&layout.events, &layout.statuses, &layout.letters] {
                let subject = format!("STREAM.DELETE.{stream}");
                let answer: Result<Deleted, _> =
                    connection::api(&shared.conn.js, OPERATION, subject, &connection::Empty {}).await?;
                match answer {
                    Ok(Deleted {}) => {}
                    Err(error)
                        if error.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                    Err(error) => {
                        return Err(connection::refused(
                            OPERATION,
                            &format!("delete stream {stream}"),
                            &error,
                        ));
                    }
                }
            }
            Ok(())
        });
        let closed = self.close();
        deleted.and(closed)
    }

    /// The shared state, unless closed.
    fn open(&self, operation: &'static str) -> Result<&Arc<Shared>, ProviderError> {
        // Relaxed: a flag; a call racing `close` fails on the stopped runtime instead.
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(closed_error(NAME, operation));
        }
        Ok(&self.shared)
    }

    /// Runs `future` with the bound of a call of several rounds.
    fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        future: impl Future<Output = Result<T, ProviderError>> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let conn = &self.shared.conn;
        conn.call(operation, conn.request_timeout.saturating_mul(ROUNDS), future)
    }
}

impl Drop for NatsProvider {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl std::fmt::Debug for NatsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsProvider")
            .field("config", &self.shared.config)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl EventSink for NatsProvider {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        const OPERATION: &str = "store_batch";
        let shared = self.open(OPERATION)?;
        if events.is_empty() {
            return Ok(());
        }
        if let Some((event, error)) =
            events.iter().find_map(|e| validate_event_type(&e.event_type).err().map(|err| (e, err)))
        {
            return Err(ProviderError::new(
                NAME,
                OPERATION,
                ProviderErrorKind::InvalidInput(format!(
                    "event {}: {error}; nothing of the batch was stored",
                    event.id
                )),
            ));
        }
        if let Some(origin) = origin.filter(|o| o.chars().any(char::is_control)) {
            return Err(ProviderError::new(
                NAME,
                OPERATION,
                ProviderErrorKind::InvalidInput(format!(
                    "origin {origin:?} has a control character, which a header value cannot carry"
                )),
            ));
        }
        // Read back without it, the origin would name another group: that group would take the
        // events for its own and never receive them.
        if let Some(origin) = origin.filter(|o| o.ends_with(char::is_whitespace)) {
            return Err(ProviderError::new(
                NAME,
                OPERATION,
                ProviderErrorKind::InvalidInput(format!(
                    "origin {origin:?} ends with whitespace, which a header value loses"
                )),
            ));
        }
        let batch = sink::prepare(shared, events, origin);
        // A message over the server's `max_payload` makes the server close the connection and
        // its publish time out: no retry can store it. The rest of the batch is stored; the
        // oversized events are reported as invalid input.
        let max_payload = shared.conn.client.server_info().max_payload;
        let (batch, oversized): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|item| max_payload == 0 || item.size() <= max_payload);
        if !batch.is_empty() {
            self.run(OPERATION, sink::store(Arc::clone(shared), batch))?;
        }
        match oversized.first() {
            None => Ok(()),
            Some(first) => Err(ProviderError::new(
                NAME,
                OPERATION,
                ProviderErrorKind::InvalidInput(format!(
                    "{} event(s) exceed the server's max_payload of {max_payload} bytes (event {}: {} \
                     bytes) and were not stored; the rest of the batch was",
                    oversized.len(),
                    first.id(),
                    first.size()
                )),
            )),
        }
    }

    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        const OPERATION: &str = "update_status_batch";
        let shared = self.open(OPERATION)?;
        if updates.is_empty() {
            return Ok(());
        }
        self.run(OPERATION, sink::update(Arc::clone(shared), sink::group_updates(updates)))
    }

    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError> {
        const OPERATION: &str = "store_dead_letters";
        let shared = self.open(OPERATION)?;
        if letters.is_empty() {
            return Ok(());
        }
        self.run(OPERATION, sink::store_letters(Arc::clone(shared), letters.to_vec()))
    }

    fn flush(&self) -> Result<(), ProviderError> {
        const OPERATION: &str = "flush";
        let shared = self.open(OPERATION)?;
        // Every write returned after its acknowledgement: flushing the client is all that is left.
        let client = shared.conn.client.clone();
        self.run(OPERATION, async move {
            client
                .flush()
                .await
                .map_err(|error| connection::unavailable(OPERATION, format!("flush: {error}")))
        })
    }
}

impl EventStore for NatsProvider {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        let shared = self.open("get")?;
        self.run("get", store::get(Arc::clone(shared), id))
    }

    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let shared = self.open("list")?;
        self.run("list", store::list(Arc::clone(shared), filter.clone()))
    }

    fn delete(&self, id: EventId) -> Result<bool, ProviderError> {
        let shared = self.open("delete")?;
        self.run("delete", sink::delete(Arc::clone(shared), id))
    }

    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<ReplayPage, ProviderError> {
        let shared = self.open("replay")?;
        let events = self.run("replay", store::replay(Arc::clone(shared), from, pattern.cloned(), limit))?;
        Ok(ReplayPage::from_events(events, limit))
    }

    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError> {
        let shared = self.open("list_dead_letters")?;
        self.run("list_dead_letters", store::list_letters(Arc::clone(shared), filter.clone()))
    }

    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError> {
        let shared = self.open("get_dead_letter")?;
        self.run("get_dead_letter", store::get_letter(Arc::clone(shared), id))
    }

    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError> {
        let shared = self.open("delete_dead_letter")?;
        self.run("delete_dead_letter", store::delete_letter(Arc::clone(shared), id))
    }

    fn stats(&self) -> Result<ProviderStats, ProviderError> {
        const OPERATION: &str = "stats";
        let shared = Arc::clone(self.open(OPERATION)?);
        self.run(OPERATION, async move {
            let events = store::stream_state(&shared, OPERATION, &shared.layout.events).await?;
            let letters = store::stream_state(&shared, OPERATION, &shared.layout.letters).await?;
            let [pending, processing, completed, failed] =
                store::status_counts(&shared, events.first_sequence).await?;
            let relaxed = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
            let (writes, inbound, events_seen) = (&shared.writes, &shared.inbound, &shared.conn.events);
            Ok(ProviderStats {
                provider_type: NAME.to_owned(),
                total_events: pending + processing + completed + failed,
                pending_events: pending,
                processing_events: processing,
                completed_events: completed,
                failed_events: failed,
                events_published: relaxed(&writes.published),
                events_consumed: relaxed(&inbound.handed_out),
                active_subscribers: relaxed(&inbound.open),
                dead_letters: letters.messages,
                provider_specific: BTreeMap::from([
                    ("server_version".to_owned(), shared.conn.client.server_info().version.into()),
                    ("stream_messages".to_owned(), events.messages.into()),
                    ("stream_bytes".to_owned(), events.bytes.into()),
                    ("stream_first_seq".to_owned(), events.first_sequence.into()),
                    ("stream_last_seq".to_owned(), events.last_sequence.into()),
                    ("stream_consumers".to_owned(), events.consumer_count.into()),
                    ("dead_letter_bytes".to_owned(), letters.bytes.into()),
                    ("replaced".to_owned(), relaxed(&writes.replaced).into()),
                    ("echoes_skipped".to_owned(), relaxed(&inbound.echoes_skipped).into()),
                    ("filtered_after_fetch".to_owned(), relaxed(&inbound.filtered_after_fetch).into()),
                    ("undecodable".to_owned(), relaxed(&inbound.undecodable).into()),
                    ("held_redeliveries".to_owned(), relaxed(&inbound.held_redeliveries).into()),
                    ("status_cache".to_owned(), shared.cache.lock().len().into()),
                    ("disconnects".to_owned(), relaxed(&events_seen.disconnects).into()),
                    ("connects".to_owned(), relaxed(&events_seen.reconnects).into()),
                    ("multi_filter".to_owned(), shared.conn.multi_filter().into()),
                ]),
            })
        })
    }
}

/// The servers of `config` (`host:port`, credentials left out, sorted: a list names one cluster
/// whatever its order), the account, and its event stream, on which the durable consumers live.
///
/// Accounts on one server are separate JetStream namespaces: a stream name in two is two streams.
/// The account is `account` as the server named it (2.10 and later), else what tells it apart in
/// the credentials, secrets left out: the user name, the `NKey`'s public key, the credentials
/// file. A token, or no credentials, names none: the server has one account for those. Told by
/// credentials, two users of one account are two namespaces, where they share the consumers.
fn group_namespace(config: &NatsConfig, account: Option<&str>) -> GroupNamespace {
    let (servers, auth) = connection::credentials(config)
        // Unreachable: the connection was made with these servers and credentials.
        .unwrap_or_default();
    let mut servers: Vec<String> =
        servers.iter().map(|server| format!("{}:{}", server.host(), server.port())).collect();
    servers.sort();
    servers.dedup();
    let account = match (account, auth) {
        (Some(account), _) => format!(", account {account}"),
        (None, NatsAuth::UserPassword { user, .. }) => format!(", user {user}"),
        (None, NatsAuth::NKey(seed)) => nkeys::KeyPair::from_seed(&seed)
            .map(|pair| format!(", nkey {}", pair.public_key()))
            // Unreachable: the client signed with it.
            .unwrap_or_default(),
        (None, NatsAuth::CredentialsFile(path)) => format!(", credentials {}", path.display()),
        (None, NatsAuth::Token(_) | NatsAuth::None) => String::new(),
    };
    GroupNamespace::new(NAME, format!("{}{account}, stream {}", servers.join(" "), config.stream_name))
}

impl Provider for NatsProvider {
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
            durable: self.shared.config.storage == NatsStorage::File,
            inline_writes: false,
        }
    }

    fn open_inbound(&self, config: &InboundConfig) -> Result<Arc<dyn Inbound>, ProviderError> {
        let shared = self.open("open_inbound")?;
        self.run("open_inbound", inbound::open(Arc::clone(shared), config.clone()))
    }

    fn delete_group(&self, group: &ConsumerGroup) -> Result<bool, ProviderError> {
        let shared = self.open("delete_group")?;
        self.run("delete_group", inbound::delete(Arc::clone(shared), group.clone()))
    }

    /// `nats <host>:<port>…[, <account>], stream <name>`: the servers as the URL names them, sorted,
    /// and what tells the account apart, when anything does (see the module docs).
    fn group_namespace(&self) -> GroupNamespace {
        self.shared.namespace.clone()
    }

    fn close(&self) -> Result<(), ProviderError> {
        // Relaxed: `shutdown` is idempotent and serialises itself.
        self.shared.closed.store(true, Ordering::Relaxed);
        self.shared.conn.shutdown(self.shared.config.request_timeout.min(Duration::from_secs(2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(url: &str, auth: NatsAuth, account: Option<&str>) -> String {
        let config = NatsConfig { auth, stream_name: "EV".into(), ..NatsConfig::new(url) };
        group_namespace(&config, account).to_string()
    }

    /// Two accounts on one server are two namespaces, told by the account the server names, else
    /// by the credentials; no secret shows.
    #[test]
    fn the_group_namespace_tells_accounts_apart_without_secrets() {
        let user = |user: &str| NatsAuth::UserPassword { user: user.into(), password: "hunter2".into() };
        let plain = namespace("nats://h:4222", NatsAuth::None, None);
        assert!(plain.ends_with(" h:4222, stream EV"), "{plain}");
        assert_eq!(namespace("nats://hunter2@h", NatsAuth::None, None), plain, "a token names no account");

        let alice = namespace("nats://h", user("alice"), None);
        assert!(alice.ends_with(" h:4222, user alice, stream EV"), "{alice}");
        assert_eq!(namespace("nats://alice:hunter2@h", NatsAuth::None, None), alice, "the URL's user");
        assert_ne!(namespace("nats://h", user("bob"), None), alice);

        let named = namespace("nats://h", user("alice"), Some("ORDERS"));
        assert!(named.ends_with(" h:4222, account ORDERS, stream EV"), "{named}");
        assert_eq!(namespace("nats://h", user("bob"), Some("ORDERS")), named, "one account, two users");
        assert_ne!(namespace("nats://h", user("alice"), Some("BILLING")), named);

        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().expect("a seed");
        let keyed = namespace("nats://h", NatsAuth::NKey(seed.clone()), None);
        assert!(keyed.contains(&format!(", nkey {}, ", pair.public_key())), "{keyed}");
        let creds = namespace("nats://h", NatsAuth::CredentialsFile("/etc/nats/a.creds".into()), None);
        assert!(creds.contains(", credentials /etc/nats/a.creds, "), "{creds}");
        for shown in [alice, named, keyed, creds] {
            assert!(!shown.contains("hunter2") && !shown.contains(&seed), "{shown}");
        }
    }
}
