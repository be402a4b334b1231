//! The inbound source: the events other instances publish, fetched in batches and acknowledged
//! once handled.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ProviderError;
use crate::event::Event;
use crate::pattern::Pattern;

/// Which group a broker receives events in.
///
/// Each group receives every event published by other groups, once: the group's members share
/// them. A broker alone in its group ([`ConsumerGroup::Instance`], fan-out) therefore receives
/// everything; brokers naming one [`ConsumerGroup::Shared`] group (work-queue) split the events
/// between them, each event to one member.
///
/// A group never receives the events its own members publish (no echo): those reach the
/// publishing broker's subscribers through its own shards, once, and no other member of its group.
///
/// ```
/// use eventbroker::ConsumerGroup;
///
/// let fan_out = ConsumerGroup::Instance("api-1".into());
/// let queue = ConsumerGroup::Shared("mailers".into());
/// assert_eq!(fan_out.key(), "instance:api-1");
/// assert_eq!(queue.key(), "shared:mailers");
/// assert!(queue.is_shared() && !fan_out.is_shared());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConsumerGroup {
    /// The broker's own durable group, named by its instance id (fan-out). A broker restarted
    /// under the same instance id resumes where its predecessor left off.
    Instance(String),
    /// A group shared by every broker that names it (work-queue).
    Shared(String),
}

impl ConsumerGroup {
    /// The group's name: the instance id, or the shared group's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Instance(name) | Self::Shared(name) => name,
        }
    }

    /// Whether several brokers share this group.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Shared(_))
    }

    /// A key that names the group unambiguously (`instance:<id>` or `shared:<name>`): what a
    /// sink records as an event's origin, and what a backend may derive its own names from.
    pub fn key(&self) -> String {
        match self {
            Self::Instance(name) => format!("instance:{name}"),
            Self::Shared(name) => format!("shared:{name}"),
        }
    }
}

/// How a broker's inbound source is opened; see [`Provider::open_inbound`](super::Provider::open_inbound).
///
/// ```
/// use std::time::Duration;
/// use eventbroker::{ConsumerGroup, InboundConfig};
///
/// let config = InboundConfig::new("api-1", ConsumerGroup::Shared("mailers".into()))
///     .with_claim_idle(Duration::from_secs(10));
/// assert_eq!(config.consumer(), "api-1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundConfig {
    instance_id: String,
    group: ConsumerGroup,
    claim_idle: Duration,
}

impl InboundConfig {
    /// How long an event may stay fetched and unacknowledged before the group hands it to
    /// another member (or, fan-out, to the instance's next incarnation), unless extended. Default.
    pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);

    /// A source for instance `instance_id` in `group`, with the default claim idle time.
    pub fn new(instance_id: impl Into<String>, group: ConsumerGroup) -> Self {
        Self { instance_id: instance_id.into(), group, claim_idle: Self::DEFAULT_CLAIM_IDLE }
    }

    /// Sets the claim idle time (see [`InboundConfig::claim_idle`]).
    #[must_use]
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// The member's name within its group: the broker's instance id.
    pub fn consumer(&self) -> &str {
        &self.instance_id
    }

    /// The group.
    pub fn group(&self) -> &ConsumerGroup {
        &self.group
    }

    /// How long an event may stay fetched and unacknowledged before it is redelivered: to another
    /// member of a shared group whose owner seems dead (as Redis `XAUTOCLAIM` does), or to the same
    /// instance after a restart. [`Inbound::extend`] restarts the clock.
    pub fn claim_idle(&self) -> Duration {
        self.claim_idle
    }
}

/// An opaque handle on one fetched event, given back to [`Inbound::ack`], [`Inbound::nak`] or
/// [`Inbound::extend`]. Its meaning belongs to the source that issued it (a Redis entry id, a
/// JetStream stream sequence, a PostgreSQL `seq`); the broker only carries it.
///
/// ```
/// use eventbroker::AckToken;
///
/// let token = AckToken::new(42);
/// assert_eq!(token.get(), 42);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AckToken(u64);

impl AckToken {
    /// A token with the source's own value. A source whose handles do not fit in 64 bits keeps
    /// them itself, keyed by the token.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The source's value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for AckToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AckToken({})", self.0)
    }
}

/// One event from [`Inbound::fetch`].
#[derive(Debug, Clone)]
pub struct InboundEvent {
    /// The event as its publisher stored it.
    pub event: Arc<Event>,
    /// What acknowledges it.
    pub token: AckToken,
    /// How many times the group has handed it out, this time included: 1 the first time, more
    /// after a redelivery.
    pub deliveries: u32,
}

/// How the deliveries of an acknowledged event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckOutcome {
    /// Every handler succeeded, or none matched.
    Handled,
    /// A delivery failed after its last retry; its dead letter is stored. A backend that tells the
    /// two apart (JetStream's `term`) records it as a final failure; others ack it the same way.
    DeadLettered,
}

/// One acknowledgement: the token, and how the event's deliveries ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ack {
    /// The event's token.
    pub token: AckToken,
    /// How its deliveries ended.
    pub outcome: AckOutcome,
}

impl Ack {
    /// An ack of a handled event.
    pub const fn handled(token: AckToken) -> Self {
        Self { token, outcome: AckOutcome::Handled }
    }

    /// An ack of an event with a dead-lettered delivery.
    pub const fn dead_lettered(token: AckToken) -> Self {
        Self { token, outcome: AckOutcome::DeadLettered }
    }
}

/// A broker's source of the events other groups publish, opened by
/// [`Provider::open_inbound`](super::Provider::open_inbound).
///
/// The broker's inbound thread calls [`fetch`](Self::fetch) and [`set_filter`](Self::set_filter);
/// its writer thread calls [`ack`](Self::ack), [`nak`](Self::nak) and [`extend`](Self::extend),
/// concurrently with the fetches. Every method is blocking and must return within a bound of the
/// backend's choosing (a network round trip with a timeout), never hang.
///
/// ## Delivery
/// - **Once per group.** Each event stored by another group is handed to this group once, to one
///   member, in store order per member; events whose origin is this group never are (no echo).
/// - **At least once.** A fetched event stays owned by this member until it is acknowledged. If
///   the member stops acknowledging (it crashed, or a handler outlived the claim idle time without
///   an [`extend`](Self::extend)), the event is fetched again, by another member of a shared group
///   or by the instance's next incarnation, with [`InboundEvent::deliveries`] above 1.
/// - **Filters.** After [`set_filter`](Self::set_filter) the source hands out only events whose
///   type matches one of the patterns (an empty list: none). The others count as handled for this
///   group — they were not wanted — and are never acknowledged on behalf of another group. With
///   [`Capabilities::filter_at_source`](super::Capabilities::filter_at_source) they never even
///   cross the network. The members of a shared group are expected to subscribe alike.
/// - **Backpressure.** The broker asks for at most as many events as its shards have room for,
///   so a slow consumer leaves events on the server, not in memory.
pub trait Inbound: Send + Sync {
    /// Up to `max` events, waiting up to `wait` for the first one; an empty batch when none came.
    /// Events this member was handed before and did not acknowledge, and events another member
    /// abandoned (see [`InboundConfig::claim_idle`]), come before new ones.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`](crate::ProviderErrorKind::Closed) after
    /// [`Inbound::close`] or the provider's close; a backend failure otherwise, after which the
    /// broker fetches again with backoff (nothing fetched and unreturned is lost: it is redelivered).
    fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError>;

    /// Acknowledges handled events: the group will not hand them out again. Acknowledging a token
    /// twice, or one the group has since handed to another member, is not an error.
    ///
    /// # Errors
    /// As [`Inbound::fetch`]; the broker's writer retries transient failures.
    fn ack(&self, acks: &[Ack]) -> Result<(), ProviderError>;

    /// Gives events back unhandled: the group hands them out again after `delay`, to this member or
    /// another. The broker naks what it fetched and could not finish before shutting down. A token
    /// the group has since handed to another member (this member's claim lapsed) is left to that
    /// member: giving it back would hand it out again while that member handles it.
    ///
    /// # Errors
    /// As [`Inbound::ack`].
    fn nak(&self, tokens: &[AckToken], delay: Duration) -> Result<(), ProviderError>;

    /// Says the events are still being worked on (a delivery waits for a long retry): restarts
    /// their claim idle time.
    ///
    /// # Errors
    /// As [`Inbound::ack`].
    fn extend(&self, tokens: &[AckToken]) -> Result<(), ProviderError>;

    /// Replaces the patterns this member wants (the broker's subscriptions); see the type docs.
    /// Applies to every fetch that starts after it returns.
    ///
    /// # Errors
    /// As [`Inbound::ack`].
    fn set_filter(&self, patterns: &[Pattern]) -> Result<(), ProviderError>;

    /// Events this source's group lost before any of its members was handed them (a bounded log
    /// that dropped them first), as far as the backend counts them: 0 where it does not. Read for
    /// [`InboundStats::lost`](crate::InboundStats::lost); the memory provider's bus and the Redis
    /// provider (its stream trimmed past them) count them.
    fn lost(&self) -> u64 {
        0
    }

    /// Stops fetching and releases the source. Unacknowledged events stay with the group, to be
    /// redelivered. Later calls return `Closed`; a second `close` returns `Ok(())`.
    ///
    /// # Errors
    /// A backend failure; the source is closed all the same.
    fn close(&self) -> Result<(), ProviderError>;
}
