//! The inbound source: a durable pull consumer per consumer group on the event stream.
//!
//! - Fan-out groups (`instance:<id>`) and shared groups (`shared:<name>`) each get one durable
//!   consumer, named from the group key (`eb-i-<id>`, `eb-s-<name>`; bytes other than ASCII
//!   letters, digits and `-` written as `_XX`). A group seen for the first time starts with the
//!   events stored after its consumer is made (deliver policy `new`); a consumer that exists is
//!   resumed where it stands.
//! - `ack_wait` is the group's claim idle time: an event fetched and not acknowledged within it is
//!   handed out again, to any member (`+WPI`, from [`extend`](Inbound::extend), restarts the
//!   clock). A restarted instance gets what its predecessor left unacknowledged once that time has
//!   passed.
//! - [`set_filter`](Inbound::set_filter) sets the consumer's filter subject(s), so events no
//!   pattern wants stay on the server (see the `subject` module for how patterns become
//!   filters); the exact patterns are checked again after fetching, which only matters when a
//!   2.9 server's single filter had to be widened. Members of a shared group share its filter.
//!   A write of the filter that fails never leaves the consumer pulling with the filter before
//!   it, which would pass over, for good, the events only the new patterns want: after a write
//!   that got no answer (the server's filter is then unknown) nothing is pulled until a write
//!   takes, each fetch trying it first and failing with its error; a filter the server refuses
//!   is replaced by none, the patterns checked after fetching, and written again once a second
//!   (`FILTER_RETRY`) at the next fetch, until it takes. Either way the consumer stands where it
//!   stood, and the events stored meanwhile meet the new patterns.
//! - [`fetch`](Inbound::fetch) polls: a pull request for what is available now, and when nothing
//!   is, another after a pause that doubles from 1 ms up to
//!   [`NatsConfig::fetch_poll_interval`](super::NatsConfig::fetch_poll_interval) (20 ms by default),
//!   until its wait is over. An idle source thus sends up to 50 small requests a second, and an
//!   event published to an idle group waits up to that interval. Requests are never held open on
//!   the server: a 2.9.10 server left a held request unanswered while a redelivery came due and
//!   then handed out an acknowledged event again (seen in about one nak-with-delay in six).
//! - Echoes — events whose `Eventbroker-Origin` header is this group — are fetched (a filter cannot
//!   select on headers) and acknowledged at once, never handed out.
//! - A message whose body is not an event is terminated (`+TERM`) and counted as `undecodable`.
//! - A consumer that is gone while its source lives (`delete_group`, or an operator, removed it) no
//!   longer answers pulls: the first fetch that gets no answer within
//!   [`NatsConfig::request_timeout`](super::NatsConfig::request_timeout), or the next
//!   [`set_filter`](Inbound::set_filter), whichever comes first, finds it gone and makes it again,
//!   with the source's filter, starting after the last message the source saw (deliver policy
//!   `by_start_sequence`). What the old consumer had handed out and not seen acknowledged is
//!   forgotten with it; what was stored since is delivered, and nothing the source already saw.
//!   A filter is written to a consumer only after a look that it still exists (one round trip
//!   more), keeping the deliver policy it has: a plain write would make a missing consumer at the
//!   stream's end. A 2.10 server refuses the write itself when the consumer went after that look;
//!   on a 2.9 server a consumer removed within that one round trip is made anew with the deliver
//!   policy it had (`new`: at the stream's end).
//! - The server hands an unacknowledged event out again once the claim idle time has passed, to
//!   whichever member pulls first. When that is the member still holding it (its broker is still
//!   working on it), the redelivery is held, not handed out twice, and counted as
//!   `held_redeliveries`: another member takes it over only by pulling first, which every member
//!   with an open long poll does in turn.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::Shared;
use super::connection::{Delivered, api, pull, refused, unavailable};
use super::subject::{Filter, cover, disjoint_cover, event_type_of};
use super::wire::{ORIGIN, TYPE, decode_event};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::pattern::{Pattern, PatternSet};
use crate::provider::{
    Ack, AckOutcome, AckToken, ConsumerGroup, Inbound, InboundConfig, InboundEvent, closed_error,
};

const NAME: &str = super::connection::NAME;

/// Longest durable consumer name made from a group key.
const MAX_DURABLE: usize = 200;

/// The first pause of a fetch that found nothing; pauses double up to
/// [`NatsConfig::fetch_poll_interval`](super::NatsConfig::fetch_poll_interval).
const FIRST_POLL: Duration = Duration::from_millis(1);

/// Most acknowledgement subjects a source keeps for events it handed out and the broker has not
/// acknowledged or given back; beyond that the oldest are forgotten (their events are redelivered
/// after the claim idle time).
const MAX_TOKENS: usize = 1 << 20;

/// The durable consumer name of `group`.
pub(super) fn durable_name(group: &ConsumerGroup) -> Result<String, ProviderError> {
    let (tag, name) = match group {
        ConsumerGroup::Instance(name) => ("eb-i-", name),
        ConsumerGroup::Shared(name) => ("eb-s-", name),
    };
    if name.is_empty() {
        return Err(invalid("open_inbound", "the consumer group name is empty".to_owned()));
    }
    if name.chars().any(char::is_control) {
        // The group key is every stored event's origin header, which cannot carry one.
        return Err(invalid(
            "open_inbound",
            format!("the consumer group name {name:?} has a control character"),
        ));
    }
    if name.ends_with(char::is_whitespace) {
        // A header value is read back without its trailing whitespace: the group's own events
        // would not read as its echoes, and would read as those of the group named without it.
        return Err(invalid(
            "open_inbound",
            format!(
                "the consumer group name {name:?} ends with whitespace, which the origin header of \
                 its events cannot carry"
            ),
        ));
    }
    let mut durable = String::from(tag);
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            durable.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(durable, "_{byte:02X}");
        }
    }
    if durable.len() > MAX_DURABLE {
        return Err(invalid(
            "open_inbound",
            format!(
                "consumer group {name:?} makes a consumer name of {} bytes; the limit is {MAX_DURABLE}",
                durable.len()
            ),
        ));
    }
    Ok(durable)
}

fn invalid(operation: &'static str, message: String) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::InvalidInput(message))
}

/// `duration` in nanoseconds, as the server reads a duration: a Go `time.Duration`, at most
/// `i64::MAX` (about 292 years). Longer ones are taken as that; written as they are, the server
/// refuses a consumer's `ack_wait` as invalid JSON and takes a nak's delay for none.
fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// The settings of a group's durable consumer that the provider manages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct DurableConfig {
    durable_name: String,
    deliver_policy: String,
    ack_policy: String,
    ack_wait: i64,
    max_deliver: i64,
    /// Where a consumer made again after it was lost starts (deliver policy `by_start_sequence`).
    #[serde(skip_serializing_if = "Option::is_none")]
    opt_start_seq: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    filter_subject: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    filter_subjects: Vec<String>,
    replay_policy: String,
    max_ack_pending: i64,
}

#[derive(Serialize)]
struct CreateDurable<'a> {
    stream_name: &'a str,
    config: &'a DurableConfig,
    /// `update` for a write that must not make the consumer: a 2.10 server refuses it when the
    /// consumer does not exist (a 2.9 server ignores the field and makes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
}

#[derive(Deserialize)]
struct ConsumerInfo {
    config: DurableConfig,
    #[serde(default)]
    delivered: DeliveredUpTo,
}

/// How far a consumer has gone through the stream.
#[derive(Debug, Default, Deserialize)]
struct DeliveredUpTo {
    /// The stream sequence it has passed: handed out, or skipped by its filter.
    #[serde(default)]
    stream_seq: u64,
}

/// Counts of what this handle's sources did.
#[derive(Debug, Default)]
pub(super) struct InboundCounters {
    pub(super) open: AtomicU64,
    pub(super) handed_out: AtomicU64,
    pub(super) echoes_skipped: AtomicU64,
    pub(super) filtered_after_fetch: AtomicU64,
    pub(super) undecodable: AtomicU64,
    pub(super) held_redeliveries: AtomicU64,
}

/// Deletes `group`'s durable consumer, with what it had pending; `false` when there was none.
pub(super) async fn delete(shared: Arc<Shared>, group: ConsumerGroup) -> Result<bool, ProviderError> {
    const OPERATION: &str = "delete_group";
    #[derive(serde::Deserialize)]
    struct Deleted {}
    let durable = durable_name(&group)?;
    let stream = &shared.layout.events;
    let deleted: Result<Deleted, _> = api(
        &shared.conn.js,
        OPERATION,
        format!("CONSUMER.DELETE.{stream}.{durable}"),
        &super::connection::Empty {},
    )
    .await?;
    match deleted {
        Ok(Deleted {}) => Ok(true),
        Err(error) if error.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND => Ok(false),
        Err(error) => Err(refused(OPERATION, &format!("consumer {durable} of stream {stream}"), &error)),
    }
}

/// Opens the source of `config`'s group, creating its durable consumer or bringing an existing
/// one's claim idle time and pending limit to this provider's.
pub(super) async fn open(
    shared: Arc<Shared>,
    config: InboundConfig,
) -> Result<Arc<dyn Inbound>, ProviderError> {
    const OPERATION: &str = "open_inbound";
    let durable = durable_name(config.group())?;
    let stream = shared.layout.events.clone();
    let mut desired = DurableConfig {
        durable_name: durable.clone(),
        deliver_policy: "new".to_owned(),
        ack_policy: "explicit".to_owned(),
        ack_wait: nanos(config.claim_idle().max(Duration::from_millis(1))),
        max_deliver: -1,
        opt_start_seq: None,
        filter_subject: Filter::all().subject(&shared.layout.prefix),
        filter_subjects: Vec::new(),
        replay_policy: "instant".to_owned(),
        max_ack_pending: i64::try_from(shared.config.max_ack_pending).unwrap_or(i64::MAX),
    };
    let existing: Result<ConsumerInfo, _> = api(
        &shared.conn.js,
        OPERATION,
        format!("CONSUMER.INFO.{stream}.{durable}"),
        &super::connection::Empty {},
    )
    .await?;
    let mut position = 0;
    let current = match existing {
        Ok(info) => {
            // Keep where it stands and what it filters; members that come back set their filter.
            desired.deliver_policy.clone_from(&info.config.deliver_policy);
            desired.opt_start_seq = info.config.opt_start_seq;
            desired.filter_subject.clone_from(&info.config.filter_subject);
            desired.filter_subjects.clone_from(&info.config.filter_subjects);
            position = info.delivered.stream_seq;
            Some(info.config)
        }
        Err(error) if error.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND => None,
        Err(error) => {
            return Err(refused(OPERATION, &format!("consumer {durable} of stream {stream}"), &error));
        }
    };
    let needs_write = current.as_ref().is_none_or(|current| {
        current.ack_wait != desired.ack_wait || current.max_ack_pending != desired.max_ack_pending
    });
    if needs_write {
        position = write_consumer(&shared, OPERATION, &desired).await?.delivered.stream_seq;
    }
    shared.inbound.open.fetch_add(1, Ordering::Relaxed);
    Ok(Arc::new(NatsInbound {
        inner: Arc::new(Source {
            shared,
            group_key: config.group().key(),
            shared_group: config.group().is_shared(),
            claim_idle: config.claim_idle(),
            given_back: Mutex::new(BTreeMap::new()),
            durable,
            consumer: tokio::sync::Mutex::new(ConsumerState { wanted: desired, applied: Applied::Exact }),
            position: AtomicU64::new(position),
            wanted: Mutex::new(None),
            tokens: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
        }),
    }))
}

/// Creates the durable consumer `config` describes, or updates it to `config`; what the server
/// says the consumer is now.
async fn write_consumer(
    shared: &Shared,
    operation: &'static str,
    config: &DurableConfig,
) -> Result<ConsumerInfo, ProviderError> {
    write_consumer_as(shared, operation, config, None).await?.map_err(|error| {
        let stream = &shared.layout.events;
        refused(operation, &format!("write consumer {} of stream {stream}", config.durable_name), &error)
    })
}

/// Sends the write of `config` with `action`; the server's refusal as it came.
async fn write_consumer_as(
    shared: &Shared,
    operation: &'static str,
    config: &DurableConfig,
    action: Option<&'static str>,
) -> Result<Result<ConsumerInfo, async_nats::jetstream::Error>, ProviderError> {
    let stream = &shared.layout.events;
    let subject = format!("CONSUMER.DURABLE.CREATE.{stream}.{}", config.durable_name);
    api(&shared.conn.js, operation, subject, &CreateDurable { stream_name: stream, config, action }).await
}

/// What the server says of `durable`: its settings and where it stands, or its refusal
/// (`CONSUMER_NOT_FOUND` when it is gone).
async fn consumer_info(
    shared: &Shared,
    operation: &'static str,
    durable: &str,
) -> Result<Result<ConsumerInfo, async_nats::jetstream::Error>, ProviderError> {
    let stream = &shared.layout.events;
    api(&shared.conn.js, operation, format!("CONSUMER.INFO.{stream}.{durable}"), &super::connection::Empty {})
        .await
}

/// One broker's source; see the module docs.
struct NatsInbound {
    inner: Arc<Source>,
}

struct Source {
    shared: Arc<Shared>,
    group_key: String,
    /// Whether other brokers share the group (work-queue).
    shared_group: bool,
    claim_idle: Duration,
    /// In a shared group, events this member gave back (`nak`), by stream sequence, with when:
    /// one it no longer wants is given back again, for another member, rather than acknowledged
    /// as unwanted, for [`GIVE_BACK_WINDOW`].
    given_back: Mutex<BTreeMap<u64, std::time::Instant>>,
    durable: String,
    /// The consumer as this source wants it and as the server has it. Async: held across the
    /// writes, so that two writes of different filters never cross on their way to the server.
    consumer: tokio::sync::Mutex<ConsumerState>,
    /// The highest stream sequence the consumer had passed, as this source saw it: where the
    /// consumer starts again if it is lost.
    position: AtomicU64,
    /// The patterns of the last `set_filter`; `None` before the first: everything is wanted.
    wanted: Mutex<Option<Arc<PatternSet<()>>>>,
    /// Acknowledgement subjects of the events handed out, by stream sequence (the token).
    tokens: Mutex<BTreeMap<u64, String>>,
    closed: AtomicBool,
}

/// The group's consumer as a source wants it, and what the server has of it.
#[derive(Debug)]
struct ConsumerState {
    /// The settings with the filter of the last `set_filter`, and the deliver policy the server
    /// last said the consumer has.
    wanted: DurableConfig,
    applied: Applied,
}

/// What the server has of [`ConsumerState::wanted`]'s filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// That filter.
    Exact,
    /// Not known: a write failed or was cut short, and the consumer may still have the filter
    /// before. Nothing is pulled until a write takes: pulled under the old filter, the consumer
    /// would move past the events only the new one wants, for good.
    Pending,
    /// None: the server refused the filter and took the consumer without one. Pulls go on, the
    /// patterns are checked after fetching, and the filter is written again from `retry_at` on.
    Unfiltered { retry_at: tokio::time::Instant },
}

/// How long a source whose filter the server refused fetches unfiltered before writing it again.
const FILTER_RETRY: Duration = Duration::from_secs(1);

impl Source {
    fn check_open(&self, operation: &'static str) -> Result<(), ProviderError> {
        // Relaxed: a flag; a call racing `close` may still run once, which is harmless.
        if self.closed.load(Ordering::Relaxed) || self.shared.closed.load(Ordering::Relaxed) {
            return Err(closed_error(NAME, operation));
        }
        Ok(())
    }

    /// Sorts out a pulled batch: echoes and unwanted events are acknowledged, undecodable messages
    /// terminated, the rest handed out.
    async fn sort(&self, pulled: Vec<Delivered>) -> Result<Vec<InboundEvent>, ProviderError> {
        // Read after the pull: `set_filter` changes these patterns before the server's filter, so
        // they are never older than the filter the pulled messages passed.
        let wanted = self.wanted.lock().clone();
        let wanted = wanted.as_deref();
        let counters = &self.shared.inbound;
        let client = &self.shared.conn.client;
        let prefix = &self.shared.layout.prefix;
        let mut events = Vec::with_capacity(pulled.len());
        let mut replies = Vec::with_capacity(pulled.len());
        for delivered in pulled {
            if delivered.header(ORIGIN) == Some(self.group_key.as_str()) {
                counters.echoes_skipped.fetch_add(1, Ordering::Relaxed);
                publish_ack(client, "fetch", &delivered.reply, ACK).await?;
                continue;
            }
            // Unwanted events are told apart by their type alone: the header, else the subject.
            let event_type = delivered
                .header(TYPE)
                .map(str::to_owned)
                .or_else(|| event_type_of(prefix, &delivered.message.subject));
            if let (Some(set), Some(event_type)) = (wanted, &event_type) {
                if !set.is_match(event_type) {
                    self.pass_over_unwanted(&delivered).await?;
                    continue;
                }
            }
            let event = match decode_event(&delivered.message.payload) {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(seq = delivered.seq, subject = %delivered.message.subject, %error,
                        "nats provider: terminating a message that is not an event");
                    counters.undecodable.fetch_add(1, Ordering::Relaxed);
                    publish_ack(client, "fetch", &delivered.reply, TERM).await?;
                    continue;
                }
            };
            if event_type.is_none() && wanted.is_some_and(|set| !set.is_match(&event.event_type)) {
                self.pass_over_unwanted(&delivered).await?;
                continue;
            }
            let mut tokens = self.tokens.lock();
            if let Some(reply) = tokens.get_mut(&delivered.seq) {
                // Redelivered past the claim idle time to the member that still holds it: the
                // broker is working on it and will acknowledge it, so it is not handed out twice;
                // the newest acknowledgement subject is kept.
                *reply = delivered.reply;
                counters.held_redeliveries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            drop(tokens);
            replies.push((delivered.seq, delivered.reply));
            events.push(InboundEvent {
                event: Arc::new(event),
                token: AckToken::new(delivered.seq),
                deliveries: delivered.count,
            });
        }
        // Recorded only now, with nothing awaited after: a sort that fails or is dropped part way
        // (an acknowledgement above that errs or outlives the call's bound) hands its events to
        // no one, and must not leave their tokens here, where every later redelivery of them
        // would be taken for one to a member still holding them, and never handed out.
        let mut tokens = self.tokens.lock();
        tokens.extend(replies);
        while tokens.len() > MAX_TOKENS {
            tokens.pop_first();
        }
        drop(tokens);
        counters.handed_out.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(events)
    }

    /// Settles a pulled message this member does not want: acknowledged for the group (counted as
    /// filtered), unless this member gave it back lately, in a shared group, for a member that
    /// wants it: then it goes back again, after a pause that lets another member's poll come first.
    async fn pass_over_unwanted(&self, delivered: &Delivered) -> Result<(), ProviderError> {
        let client = &self.shared.conn.client;
        if self.still_given_back(delivered.seq) {
            let nak = nak_body(self.claim_idle.min(GIVE_BACK_PAUSE));
            return publish_ack(client, "fetch", &delivered.reply, nak).await;
        }
        self.shared.inbound.filtered_after_fetch.fetch_add(1, Ordering::Relaxed);
        publish_ack(client, "fetch", &delivered.reply, ACK).await
    }

    /// Whether `seq` is an event this member gave back lately, in a shared group: then it goes
    /// back again rather than being acknowledged as unwanted.
    fn still_given_back(&self, seq: u64) -> bool {
        if !self.shared_group {
            return false;
        }
        let mut given_back = self.given_back.lock();
        let now = std::time::Instant::now();
        given_back.retain(|_, at| now.duration_since(*at) < GIVE_BACK_WINDOW);
        given_back.contains_key(&seq)
    }

    async fn fetch(self: Arc<Self>, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError> {
        const OPERATION: &str = "fetch";
        let conn = &self.shared.conn;
        let stream = &self.shared.layout.events;
        let deadline = tokio::time::Instant::from_std(crate::deadline::from_now(wait));
        let mut pause = FIRST_POLL;
        loop {
            self.settle_filter(OPERATION).await?;
            let pulled =
                match pull(&conn.client, OPERATION, stream, &self.durable, max, conn.request_timeout).await {
                    Ok(pulled) => pulled,
                    Err(error) => {
                        if self.make_again_if_gone().await? {
                            continue;
                        }
                        return Err(error);
                    }
                };
            if let Some(last) = pulled.iter().map(|delivered| delivered.seq).max() {
                // Relaxed: read only by this source's own fetches, which the inbound thread runs
                // one at a time.
                self.position.fetch_max(last, Ordering::Relaxed);
            }
            if !pulled.is_empty() {
                let events = self.sort(pulled).await?;
                if !events.is_empty() {
                    return Ok(events);
                }
                // Everything was an echo or unwanted: look again at once.
                pause = FIRST_POLL;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = pause.saturating_mul(2).min(self.shared.config.fetch_poll_interval);
        }
    }

    /// After a pull that failed: whether the group's consumer is gone (a consumer that does not
    /// exist answers no pull, so the pull timed out), in which case it is made again, starting
    /// after the last message this source saw; see the module docs.
    async fn make_again_if_gone(&self) -> Result<bool, ProviderError> {
        const OPERATION: &str = "fetch";
        if self.shared.conn.client.connection_state() != async_nats::connection::State::Connected {
            return Ok(false);
        }
        match consumer_info(&self.shared, OPERATION, &self.durable).await? {
            Err(error) if error.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND => {}
            Ok(_) | Err(_) => return Ok(false),
        }
        // The next pull's `settle_filter` makes it again.
        self.consumer.lock().await.applied = Applied::Pending;
        Ok(true)
    }

    /// Before a pull: writes the wanted filter unless the server has it, or has the consumer
    /// unfiltered and the next try is not due. Fails, and nothing is pulled, while neither holds.
    async fn settle_filter(&self, operation: &'static str) -> Result<(), ProviderError> {
        let mut state = self.consumer.lock().await;
        match state.applied {
            Applied::Exact => Ok(()),
            Applied::Unfiltered { retry_at } if tokio::time::Instant::now() < retry_at => Ok(()),
            Applied::Pending | Applied::Unfiltered { .. } => self.apply_filter(operation, &mut state).await,
        }
    }

    /// Writes `state.wanted`'s filter. A filter the server refuses is not left to the one before:
    /// the consumer is written without one instead, so no wanted event is passed over while the
    /// filter is tried again (see [`Applied`]). The error when neither write took.
    async fn apply_filter(
        &self,
        operation: &'static str,
        state: &mut ConsumerState,
    ) -> Result<(), ProviderError> {
        let before = state.applied;
        // What a write cut short leaves.
        state.applied = Applied::Pending;
        let refusal = match self.write_filter(operation, state.wanted.clone()).await {
            Ok(written) => {
                state.wanted = written;
                state.applied = Applied::Exact;
                return Ok(());
            }
            Err(error) if matches!(error.kind(), ProviderErrorKind::Backend(_)) => error,
            Err(error) => return Err(error),
        };
        let retry_at = tokio::time::Instant::from_std(crate::deadline::from_now(FILTER_RETRY));
        if matches!(before, Applied::Unfiltered { .. }) {
            // Refused again: the consumer still has no filter.
            state.applied = Applied::Unfiltered { retry_at };
            return Ok(());
        }
        let mut unfiltered = state.wanted.clone();
        unfiltered.filter_subject.clear();
        unfiltered.filter_subjects.clear();
        let Ok(written) = self.write_filter(operation, unfiltered).await else { return Err(refusal) };
        tracing::warn!(consumer = %self.durable, error = %refusal,
            "nats provider: the server refused the consumer's filter; fetching unfiltered, the \
             patterns checked after fetching, until it takes it");
        state.wanted.deliver_policy = written.deliver_policy;
        state.wanted.opt_start_seq = written.opt_start_seq;
        state.applied = Applied::Unfiltered { retry_at };
        Ok(())
    }

    /// Writes `config`'s filter to the group's consumer. The consumer keeps its deliver policy
    /// (the server refuses to change it, and another member may have made the consumer again);
    /// a consumer that is gone is made again where this source stood, never at the stream's end,
    /// which is where a plain write would make it (deliver policy `new`) and so pass over every
    /// event stored since it went. What the server has now.
    async fn write_filter(
        &self,
        operation: &'static str,
        config: DurableConfig,
    ) -> Result<DurableConfig, ProviderError> {
        let stream = &self.shared.layout.events;
        let current = match consumer_info(&self.shared, operation, &self.durable).await? {
            Ok(info) => info,
            Err(error) if error.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND => {
                return self.make_again(operation, config).await;
            }
            Err(error) => {
                return Err(refused(
                    operation,
                    &format!("consumer {} of stream {stream}", self.durable),
                    &error,
                ));
            }
        };
        // Relaxed: see `fetch`.
        self.position.fetch_max(current.delivered.stream_seq, Ordering::Relaxed);
        let mut update = config;
        update.deliver_policy = current.config.deliver_policy;
        update.opt_start_seq = current.config.opt_start_seq;
        // From 2.10 the write is refused, not a consumer made at the stream's end, when the
        // consumer went between the two requests; a 2.9 server leaves that one round trip open.
        let action = self.shared.conn.multi_filter().then_some("update");
        match write_consumer_as(&self.shared, operation, &update, action).await? {
            Ok(_) => Ok(update),
            Err(error) if error.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_DOES_NOT_EXIST => {
                self.make_again(operation, update).await
            }
            Err(error) => Err(refused(
                operation,
                &format!("write consumer {} of stream {stream}", self.durable),
                &error,
            )),
        }
    }

    /// Makes the group's consumer, gone, again with `config`'s filter, starting after the last
    /// message this source saw (deliver policy `by_start_sequence`); what the server has now.
    async fn make_again(
        &self,
        operation: &'static str,
        mut config: DurableConfig,
    ) -> Result<DurableConfig, ProviderError> {
        // Relaxed: see `fetch`.
        let start = self.position.load(Ordering::Relaxed).saturating_add(1);
        "by_start_sequence".clone_into(&mut config.deliver_policy);
        config.opt_start_seq = Some(start);
        tracing::warn!(consumer = %self.durable, stream = %self.shared.layout.events, start,
            "nats provider: the consumer group's consumer is gone; making it again after the last message seen");
        write_consumer(&self.shared, operation, &config).await?;
        Ok(config)
    }

    /// Sends `body` to the acknowledgement subject of each token still known, then flushes; the
    /// tokens are forgotten once the server has the acknowledgements, unless `keep`.
    fn acknowledge(
        &self,
        operation: &'static str,
        tokens: Vec<(AckToken, &'static [u8])>,
        body_extra: Option<&[u8]>,
        keep: bool,
    ) -> Result<(), ProviderError> {
        self.check_open(operation)?;
        let replies: Vec<(u64, String, bytes::Bytes)> = {
            let known = self.tokens.lock();
            tokens
                .into_iter()
                .filter_map(|(token, body)| {
                    let reply = known.get(&token.get())?.clone();
                    let body = match body_extra {
                        Some(extra) => [body, b" ", extra].concat().into(),
                        None => bytes::Bytes::from_static(body),
                    };
                    Some((token.get(), reply, body))
                })
                .collect()
        };
        if replies.is_empty() {
            return Ok(());
        }
        let client = self.shared.conn.client.clone();
        let sent: Vec<u64> = replies.iter().map(|(seq, _, _)| *seq).collect();
        self.shared.conn.call(operation, self.shared.conn.request_timeout, async move {
            for (_, reply, body) in replies {
                client
                    .publish(reply, body)
                    .await
                    .map_err(|error| unavailable(operation, format!("acknowledgement: {error}")))?;
            }
            client
                .flush()
                .await
                .map_err(|error| unavailable(operation, format!("acknowledgement flush: {error}")))
        })?;
        if !keep {
            let mut known = self.tokens.lock();
            for seq in sent {
                known.remove(&seq);
            }
        }
        Ok(())
    }
}

/// How long an event this member gave back, and no longer wants, keeps going back to the group.
const GIVE_BACK_WINDOW: Duration = Duration::from_secs(10);
/// The delay of such a give-back: long enough that another member's poll comes first.
const GIVE_BACK_PAUSE: Duration = Duration::from_millis(100);

/// A `-NAK` that asks for redelivery after `delay`.
fn nak_body(delay: Duration) -> Vec<u8> {
    let mut body = NAK.to_vec();
    body.push(b' ');
    body.extend_from_slice(&nak_delay(delay));
    body
}

/// The `{"delay":…}` a nak carries after its `-NAK`.
fn nak_delay(delay: Duration) -> Vec<u8> {
    format!("{{\"delay\":{}}}", nanos(delay)).into_bytes()
}

const ACK: &[u8] = b"+ACK";
const TERM: &[u8] = b"+TERM";
const NAK: &[u8] = b"-NAK";
const IN_PROGRESS: &[u8] = b"+WPI";

async fn publish_ack(
    client: &async_nats::Client,
    operation: &'static str,
    reply: &str,
    body: impl Into<bytes::Bytes>,
) -> Result<(), ProviderError> {
    client
        .publish(reply.to_owned(), body.into())
        .await
        .map_err(|error| unavailable(operation, format!("acknowledgement: {error}")))
}

impl Inbound for NatsInbound {
    fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError> {
        const OPERATION: &str = "fetch";
        self.inner.check_open(OPERATION)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        // The group hands out no more than this at once. The server reads a pull's batch as a
        // signed 64-bit number and refuses a larger one (`usize::MAX`, for "all there is").
        let max = max.min(self.inner.shared.config.max_ack_pending);
        let conn = &self.inner.shared.conn;
        // A pull, a look whether the consumer is gone, and the writes of its filter; a write cut
        // short leaves the filter to the next fetch (see `Applied::Pending`).
        let limit = wait.saturating_add(conn.request_timeout.saturating_mul(super::ROUNDS + 1));
        conn.call(OPERATION, limit, Arc::clone(&self.inner).fetch(max, wait))
    }

    fn ack(&self, acks: &[Ack]) -> Result<(), ProviderError> {
        let tokens = acks
            .iter()
            .map(|ack| {
                let body = match ack.outcome {
                    AckOutcome::Handled => ACK,
                    // The delivery failed for good and its dead letter is stored: a final failure.
                    AckOutcome::DeadLettered => TERM,
                };
                (ack.token, body)
            })
            .collect();
        self.inner.acknowledge("ack", tokens, None, false)
    }

    fn nak(&self, tokens: &[AckToken], delay: Duration) -> Result<(), ProviderError> {
        if self.inner.shared_group {
            let now = std::time::Instant::now();
            let mut given_back = self.inner.given_back.lock();
            given_back.extend(tokens.iter().map(|token| (token.get(), now)));
            while given_back.len() > MAX_TOKENS {
                given_back.pop_first();
            }
        }
        let extra = (!delay.is_zero()).then(|| nak_delay(delay));
        self.inner.acknowledge("nak", tokens.iter().map(|&t| (t, NAK)).collect(), extra.as_deref(), false)
    }

    fn extend(&self, tokens: &[AckToken]) -> Result<(), ProviderError> {
        self.inner.acknowledge("extend", tokens.iter().map(|&t| (t, IN_PROGRESS)).collect(), None, true)
    }

    fn set_filter(&self, patterns: &[Pattern]) -> Result<(), ProviderError> {
        const OPERATION: &str = "set_filter";
        let source = &self.inner;
        source.check_open(OPERATION)?;
        let shared = &source.shared;
        let prefix = &shared.layout.prefix;
        let (subject, subjects) = if shared.conn.multi_filter() {
            let subjects = disjoint_cover(prefix, patterns);
            if subjects.len() == 1 { (subjects[0].clone(), Vec::new()) } else { (String::new(), subjects) }
        } else {
            (cover(prefix, patterns), Vec::new())
        };
        // The patterns first, the server's filter second: see `Source::sort`.
        let set: PatternSet<()> = patterns.iter().map(|p| (p.clone(), ())).collect();
        *source.wanted.lock() = Some(Arc::new(set));
        let writer = Arc::clone(source);
        // Two writes (the filter, then none when it is refused) of three round trips at most
        // each: the look, the write, and a consumer made again.
        let limit = shared.conn.request_timeout.saturating_mul(6);
        shared.conn.call(OPERATION, limit, async move {
            let mut state = writer.consumer.lock().await;
            let same = state.wanted.filter_subject == subject && state.wanted.filter_subjects == subjects;
            // Unfiltered, the consumer passes over nothing this filter wants: the fetches write the
            // filter again when it is due.
            if same && state.applied != Applied::Pending {
                return Ok(());
            }
            state.wanted.filter_subject = subject;
            state.wanted.filter_subjects = subjects;
            writer.apply_filter(OPERATION, &mut state).await
        })
    }

    fn close(&self) -> Result<(), ProviderError> {
        // Relaxed: see `check_open`.
        if !self.inner.closed.swap(true, Ordering::Relaxed) {
            self.inner.tokens.lock().clear();
            self.inner.shared.inbound.open.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for NatsInbound {
    fn drop(&mut self) {
        // A source dropped without `close` is a vanished broker: its events stay with the group.
        if !self.inner.closed.swap(true, Ordering::Relaxed) {
            self.inner.shared.inbound.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_names_are_injective_and_bounded() {
        let name = |g: ConsumerGroup| durable_name(&g).expect("valid");
        assert_eq!(name(ConsumerGroup::Instance("api-1".into())), "eb-i-api-1");
        assert_eq!(name(ConsumerGroup::Shared("api-1".into())), "eb-s-api-1");
        assert_eq!(name(ConsumerGroup::Instance("a.b c_d".into())), "eb-i-a_2Eb_20c_5Fd");
        assert_ne!(name(ConsumerGroup::Instance("a_2E".into())), name(ConsumerGroup::Instance("a.".into())));
        let err = durable_name(&ConsumerGroup::Shared("x".repeat(300))).expect_err("too long");
        assert!(matches!(err.kind(), ProviderErrorKind::InvalidInput(_)), "{err}");
        assert!(durable_name(&ConsumerGroup::Shared(String::new())).is_err());
        assert!(durable_name(&ConsumerGroup::Shared("q\u{a0}".into())).is_err(), "read back trimmed");
        assert_eq!(name(ConsumerGroup::Shared(" q r".into())), "eb-s-_20q_20r");
    }
}
