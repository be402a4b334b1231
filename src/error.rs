//! Errors, one type per failure a caller can act on.
//!
//! Construction errors describe the input and where it went wrong
//! (`invalid pattern "us*rs" at byte 2: wildcard '*' mixed into a segment`). Errors on the publish
//! hot path are small enums that hand the event back, so nothing the caller owned is lost.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use crate::Event;

/// A boxed error: one from a dependency, kept as the `source` of one of ours, and the error type
/// of a handler that fails in more than one way (see
/// [`Broker::subscribe`](crate::Broker::subscribe)).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What is wrong with a pattern or an event type; shared by [`PatternError`] and
/// [`EventTypeError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyntaxErrorKind {
    /// The input is the empty string.
    #[error("it is empty")]
    Empty,
    /// Two dots in a row, or a dot at the start or the end.
    #[error("a segment is empty")]
    EmptySegment,
    /// The input is longer than the limit, in bytes.
    #[error("it is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The input has more segments than the limit.
    #[error("it has {count} segments; the limit is {max}")]
    TooManySegments {
        /// Number of segments in the input.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A wildcard shares a segment with other characters, as in `us*rs`.
    #[error("wildcard {wildcard:?} mixed into a segment; a wildcard must be a whole segment")]
    WildcardInSegment {
        /// The wildcard found.
        wildcard: char,
    },
    /// `>` appears before the last segment.
    #[error("'>' must be the last segment")]
    TailNotLast,
    /// An event type contains a wildcard character; only patterns may.
    #[error("wildcard {wildcard:?} is not allowed in an event type")]
    WildcardInType {
        /// The wildcard found.
        wildcard: char,
    },
    /// Whitespace or a control character.
    #[error("character {ch:?} is not allowed")]
    InvalidChar {
        /// The character found.
        ch: char,
    },
    /// A format or invisible character (Unicode `Cf` or `Default_Ignorable_Code_Point`, such as
    /// U+200B or U+FEFF): two names that look the same would differ.
    #[error("invisible or format character U+{:04X} is not allowed", u32::from(*.ch))]
    InvisibleChar {
        /// The character found.
        ch: char,
    },
}

/// A subscription pattern that does not parse.
///
/// ```
/// use eventbroker::Pattern;
///
/// let err = Pattern::parse("public.us*rs").unwrap_err();
/// assert_eq!(err.position(), 9);
/// assert_eq!(
///     err.to_string(),
///     "invalid pattern \"public.us*rs\" at byte 9: wildcard '*' mixed into a segment; \
///      a wildcard must be a whole segment"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {pattern:?} at byte {position}: {kind}")]
pub struct PatternError {
    pattern: String,
    position: usize,
    kind: SyntaxErrorKind,
}

impl PatternError {
    pub(crate) fn new(pattern: &str, position: usize, kind: SyntaxErrorKind) -> Self {
        Self { pattern: pattern.to_owned(), position, kind }
    }

    /// The pattern as given.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Byte offset in the pattern where the problem is.
    pub fn position(&self) -> usize {
        self.position
    }

    /// What is wrong.
    pub fn kind(&self) -> &SyntaxErrorKind {
        &self.kind
    }
}

/// An event type that cannot be published.
///
/// ```
/// use eventbroker::validate_event_type;
///
/// let err = validate_event_type("public..create").unwrap_err();
/// assert_eq!(err.position(), 7);
/// assert_eq!(
///     err.to_string(),
///     "invalid event type \"public..create\" at byte 7: a segment is empty"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event type {event_type:?} at byte {position}: {kind}")]
pub struct EventTypeError {
    event_type: String,
    position: usize,
    kind: SyntaxErrorKind,
}

impl EventTypeError {
    pub(crate) fn new(event_type: &str, position: usize, kind: SyntaxErrorKind) -> Self {
        Self { event_type: event_type.to_owned(), position, kind }
    }

    /// The event type as given.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// Byte offset in the type where the problem is.
    pub fn position(&self) -> usize {
        self.position
    }

    /// What is wrong.
    pub fn kind(&self) -> &SyntaxErrorKind {
        &self.kind
    }
}

/// An event payload that cannot be set or read as the requested type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The event carries no payload (`null` or absent).
    #[error("the event has no payload")]
    Empty,
    /// The text given as a raw payload is not valid JSON.
    #[error("the payload is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// The value could not be serialized to JSON.
    #[error("the payload could not be serialized: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The payload is valid JSON but does not have the shape of the requested type.
    #[error("the payload does not decode as {target}: {source}")]
    Decode {
        /// Name of the requested Rust type.
        target: &'static str,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
    },
}

/// A JSON document that is not an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Rejected by the `serde_json` decoder.
    #[error("invalid event JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Rejected by the `simd-json` decoder.
    #[error("invalid event JSON: {0}")]
    SimdJson(#[from] simd_json::Error),
    /// The document parsed, but the payload's text could not be taken from it as one JSON value.
    #[error("invalid event payload: {0}")]
    Payload(String),
}

/// What went wrong inside a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// The provider was closed; nothing more can be written or read.
    #[error("the provider is closed")]
    Closed,
    /// The backend cannot be reached, refused the request for now, or did not answer in time;
    /// trying again later may succeed. The only transient kind.
    #[error("the backend is unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (a bad filter, an invalid identifier); retrying cannot help.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The backend cannot serve this request at all (see
    /// [`Capabilities`](crate::Capabilities)); retrying cannot help.
    #[error("not supported by this backend")]
    NotSupported,
    /// The provider panicked inside the call. The broker caught it and carries on; the write is
    /// treated as permanently failed.
    #[error("the provider panicked: {0}")]
    Panicked(String),
    /// Any other failure the backend reported, which retrying will not fix (a constraint
    /// violation, a rejected payload). Report outages as [`ProviderErrorKind::Unavailable`].
    #[error("{0}")]
    Backend(String),
}

/// A provider operation that failed: which provider, which operation, and why.
///
/// Cloning is cheap (the source is shared), so one failed batch write can be reported to every
/// caller waiting on it.
///
/// ```
/// use eventbroker::{ProviderError, ProviderErrorKind};
///
/// let err = ProviderError::new("memory", "store_batch", ProviderErrorKind::Closed);
/// assert_eq!(err.to_string(), "memory provider: store_batch failed: the provider is closed");
/// assert!(!err.is_transient());
/// let down = ProviderError::new("redis", "fetch", ProviderErrorKind::Unavailable("connection refused".into()));
/// assert!(down.is_transient());
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider} provider: {operation} failed: {kind}")]
pub struct ProviderError {
    provider: &'static str,
    operation: &'static str,
    kind: ProviderErrorKind,
    #[source]
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
}

impl ProviderError {
    /// An error of `provider` (its name, e.g. `"redis"`) in `operation` (e.g. `"store_batch"`).
    pub fn new(provider: &'static str, operation: &'static str, kind: ProviderErrorKind) -> Self {
        Self { provider, operation, kind, source: None }
    }

    /// The error of a backend that cannot serve `operation` at all.
    pub fn not_supported(provider: &'static str, operation: &'static str) -> Self {
        Self::new(provider, operation, ProviderErrorKind::NotSupported)
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(Arc::from(source.into()));
        self
    }

    /// The provider's name.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// The operation that failed.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// What went wrong.
    pub fn kind(&self) -> &ProviderErrorKind {
        &self.kind
    }

    /// Whether retrying the same request later may succeed: only for
    /// [`ProviderErrorKind::Unavailable`]. The broker's writer retries transient errors with
    /// backoff and gives up on the others at once.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ProviderErrorKind::Unavailable(_))
    }
}

/// A configuration value that is out of range or inconsistent, named by its key as in the YAML
/// configuration (`retry_policy.jitter`, `buffer_size`), and by the file it was read from, if any.
///
/// ```
/// use eventbroker::ConfigError;
///
/// let err = ConfigError::new("worker_count", "must be at least 1, got 0");
/// assert_eq!(err.to_string(), "invalid configuration: worker_count: must be at least 1, got 0");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration{}: {key}: {reason}", .file.as_deref().map(|f| format!(" in {f}")).unwrap_or_default())]
pub struct ConfigError {
    key: String,
    reason: String,
    file: Option<String>,
}

impl ConfigError {
    /// An error about `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { key: key.into(), reason: reason.into(), file: None }
    }

    /// The file the configuration was read from (`Config::from_yaml_file`, feature `yaml`), if
    /// any.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// The same error, read from the file at `path`.
    #[cfg(feature = "yaml")]
    pub(crate) fn in_file(mut self, path: &std::path::Path) -> Self {
        self.file = Some(path.display().to_string());
        self
    }

    /// The configuration key at fault.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The same error about `prefix.key`: a setting's error seen from the configuration that holds
    /// it (`worker_count` → `event_broker.worker_count`).
    pub(crate) fn within(mut self, prefix: &str) -> Self {
        self.key = format!("{prefix}.{}", self.key);
        self
    }
}

/// A broker that could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The provider refused what the broker needs from it at start (its inbound source).
    #[error(transparent)]
    Provider(ProviderError),
    /// The configuration says `enabled: false`.
    #[error("the event broker is disabled by its configuration (event_broker.enabled: false)")]
    Disabled,
    /// The configuration asks for something whose cargo feature is not compiled in.
    #[error("{key}: needs the cargo feature `{feature}` of eventbroker, which is not enabled")]
    MissingFeature {
        /// The configuration key that asks for it.
        key: String,
        /// The cargo feature to enable.
        feature: &'static str,
    },
    /// The operating system refused to start a worker or writer thread.
    #[error("could not start thread {thread}: {source}")]
    Spawn {
        /// The thread's name.
        thread: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// One delivery (an event to one subscription) that failed after its last retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailure {
    /// The subscription whose handler failed.
    pub subscription_id: crate::SubscriptionId,
    /// Its pattern.
    pub pattern: String,
    /// The handler's last error (a panic is reported as `handler panicked: <message>`).
    pub error: String,
    /// Attempts made, the first included.
    pub attempts: u32,
}

/// An event the broker did not accept, handed back: nothing was stored or delivered.
///
/// Every variant carries the event; [`PublishError::into_event`] takes it back.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::{Broker, Event, EventSource, PublishError};
///
/// let broker = Broker::builder().build()?;
/// let _ = broker.shutdown(Duration::from_secs(1));
/// let err = broker.publish_async(Event::new(EventSource::System, "a.b")).unwrap_err();
/// assert!(matches!(err, PublishError::Closed(_)));
/// let event = err.into_event();
/// assert_eq!(event.event_type, "a.b");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No room: the event's shard ring is full, or the provider writer's backlog is (the provider
    /// is down or slower than publishing). Slow down or retry.
    #[error("the broker is full; the event was not accepted")]
    Full(Box<Event>),
    /// The broker is shut down or shutting down.
    #[error("the broker is shut down; the event was not accepted")]
    Closed(Box<Event>),
    /// The event's type cannot be published.
    #[error("{error}")]
    InvalidType {
        /// The event, unchanged.
        event: Box<Event>,
        /// What is wrong with its type.
        error: EventTypeError,
    },
    /// A metadata value nests arrays and objects deeper than
    /// [`Event::MAX_JSON_DEPTH`](crate::Event::MAX_JSON_DEPTH): the event could be written, but
    /// no decoder would read it back, from a provider or from another instance.
    #[error(
        "metadata {key:?} nests arrays and objects deeper than {}, which no decoder reads back",
        crate::Event::MAX_JSON_DEPTH
    )]
    InvalidMetadata {
        /// The event, unchanged.
        event: Box<Event>,
        /// The metadata key whose value is too deep.
        key: String,
    },
    /// Published through [`eventbroker::publish`](crate::publish) (or its siblings) before
    /// [`eventbroker::init`](crate::init).
    #[error("no default broker: call eventbroker::init first; the event was not accepted")]
    NotInitialized(Box<Event>),
}

impl PublishError {
    /// The event handed back.
    pub fn into_event(self) -> Event {
        match self {
            Self::Full(event)
            | Self::Closed(event)
            | Self::NotInitialized(event)
            | Self::InvalidType { event, .. }
            | Self::InvalidMetadata { event, .. } => *event,
        }
    }

    /// The event handed back, by reference.
    pub fn event(&self) -> &Event {
        match self {
            Self::Full(event)
            | Self::Closed(event)
            | Self::NotInitialized(event)
            | Self::InvalidType { event, .. }
            | Self::InvalidMetadata { event, .. } => event,
        }
    }
}

/// The deliveries of a synchronously published event that failed after their retries; each was
/// dead-lettered. Never empty when the broker reports it.
///
/// ```
/// use eventbroker::{DeliveryFailure, HandlerFailures, SubscriptionId};
///
/// let failures = HandlerFailures::new(vec![DeliveryFailure {
///     subscription_id: SubscriptionId::from_raw(1),
///     pattern: "orders.*".into(),
///     error: "smtp timeout".into(),
///     attempts: 4,
/// }]);
/// assert_eq!(failures.to_string(), "1 of the event's deliveries failed; first: orders.*: smtp timeout");
/// assert_eq!(HandlerFailures::new(Vec::new()).to_string(), "no delivery failed");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerFailures(Vec<DeliveryFailure>);

impl HandlerFailures {
    /// Wraps the failures.
    pub fn new(failures: Vec<DeliveryFailure>) -> Self {
        Self(failures)
    }

    /// The failures, in subscription order.
    pub fn failures(&self) -> &[DeliveryFailure] {
        &self.0
    }

    /// The failures, owned.
    pub fn into_failures(self) -> Vec<DeliveryFailure> {
        self.0
    }
}

impl std::fmt::Display for HandlerFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.first() {
            None => f.write_str("no delivery failed"),
            Some(first) => write!(
                f,
                "{} of the event's deliveries failed; first: {}: {}",
                self.0.len(),
                first.pattern,
                first.error
            ),
        }
    }
}

impl StdError for HandlerFailures {}

/// Why [`Broker::publish_sync`](crate::Broker::publish_sync) (and [`Broker::publish`](crate::Broker::publish))
/// did not deliver cleanly: the event was handed back, or it was delivered and some deliveries
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncPublishError {
    /// The event was not accepted; it is handed back.
    #[error(transparent)]
    Rejected(#[from] PublishError),
    /// The event was delivered; these deliveries failed after their retries and were
    /// dead-lettered.
    #[error(transparent)]
    HandlerFailed(HandlerFailures),
}

impl SyncPublishError {
    /// The event, when it was handed back.
    pub fn into_event(self) -> Option<Event> {
        match self {
            Self::Rejected(error) => Some(error.into_event()),
            Self::HandlerFailed(_) => None,
        }
    }
}

/// Why [`Broker::publish_confirmed`](crate::Broker::publish_confirmed) or
/// [`Broker::publish_confirmed_when_room`](crate::Broker::publish_confirmed_when_room) could not
/// confirm the event durable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfirmError {
    /// The event was not accepted; it is handed back.
    #[error(transparent)]
    Rejected(#[from] PublishError),
    /// The event was accepted and dispatched, but its write failed. When the error is transient
    /// the writer keeps retrying it in the background; durability is unconfirmed.
    #[error("the event was dispatched but not confirmed durable: {0}")]
    NotPersisted(#[source] ProviderError),
    /// The event was accepted and dispatched, but its write did not finish within the timeout.
    #[error("the event was dispatched but its write was not confirmed within {0:?}")]
    TimedOut(Duration),
}

/// A batch that was not wholly accepted. Events are accepted per shard in order, so what was
/// rejected is, for each partition key, a suffix of that key's events: publishing `rejected` again
/// keeps each key's order.
#[derive(Debug, thiserror::Error)]
#[error("{accepted} events accepted, {} handed back: {reason}", rejected.len())]
pub struct BatchPublishError {
    /// How many events were accepted.
    pub accepted: usize,
    /// The events not accepted, in their original order.
    pub rejected: Vec<Event>,
    /// Why the first rejected event was not accepted.
    pub reason: BatchRejection,
}

/// Why events of a batch were handed back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchRejection {
    /// A shard or the writer backlog was full.
    #[error("the broker is full")]
    Full,
    /// The broker is shut down.
    #[error("the broker is shut down")]
    Closed,
    /// One event's type is invalid; no event of the batch was accepted.
    #[error("event {index} of the batch: {error}")]
    InvalidType {
        /// Its position in the batch.
        index: usize,
        /// What is wrong with its type.
        error: EventTypeError,
    },
    /// One event's metadata value nests deeper than
    /// [`Event::MAX_JSON_DEPTH`](crate::Event::MAX_JSON_DEPTH); no event of the batch was
    /// accepted.
    #[error(
        "event {index} of the batch: metadata {key:?} nests arrays and objects deeper than {}",
        crate::Event::MAX_JSON_DEPTH
    )]
    InvalidMetadata {
        /// Its position in the batch.
        index: usize,
        /// The metadata key whose value is too deep.
        key: String,
    },
}

/// A subscription that could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The pattern does not parse.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// The broker is shut down.
    #[error("the broker is shut down")]
    Closed,
    /// Subscribed through [`eventbroker::subscribe`](crate::subscribe) before
    /// [`eventbroker::init`](crate::init).
    #[error("no default broker: call eventbroker::init first")]
    NotInitialized,
}

/// There is no default broker yet: [`eventbroker::init`](crate::init) has not been called (or
/// failed).
///
/// ```
/// // In a process that never called `eventbroker::init`:
/// assert!(matches!(eventbroker::global(), Err(eventbroker::NotInitialized)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no default broker: call eventbroker::init first")]
pub struct NotInitialized;

/// Why [`eventbroker::init`](crate::init) did not set the default broker.
///
/// ```
/// let mut config = eventbroker::config::Config::default();
/// config.enabled = false;
/// let err = eventbroker::init(&config).unwrap_err();
/// assert!(matches!(err, eventbroker::InitError::Build(eventbroker::BuildError::Disabled)));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// A default broker is already set (a process has one, for its lifetime, even once shut
    /// down).
    #[error("the default broker is already initialized (instance {instance_id})")]
    AlreadyInitialized {
        /// The instance id of the broker already set.
        instance_id: String,
    },
    /// The broker could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// A broker operation that goes through the provider (dead letters, redrive, replay, flush).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Writes were given up since the last flush reported any (permanent provider errors): the
    /// provider does not hold them.
    #[error("{dropped} writes were given up after permanent provider errors; the last: {error}")]
    WritesDropped {
        /// How many items (events, status updates, dead letters, acknowledgements).
        dropped: u64,
        /// The last error.
        error: ProviderError,
    },
    /// The writer did not confirm within the time allowed.
    #[error("{}", writer_timeout(*.0))]
    Timeout(Duration),
    /// The dead letter's event is still being handled by this broker: another delivery of it
    /// waits for a retry or an acknowledgement, and the status written when it ends would
    /// overwrite the redrive's; or another redrive of it (of this letter or another of the
    /// event's) runs. Redrive it once the event's handling has ended
    /// ([`Broker::drain`](crate::Broker::drain) waits for that); the dead letter was kept.
    #[error(
        "event {event} is still being handled (a delivery of it waits for a retry or an acknowledgement, or another redrive of it runs); the dead letter was kept"
    )]
    StillHandling {
        /// The dead letter's event.
        event: crate::EventId,
    },
    /// No dead letter has this id.
    #[error("no dead letter with id {0}")]
    NoSuchDeadLetter(crate::DeadLetterId),
    /// The dead letter's subscription is gone and no current subscription has its pattern; the
    /// dead letter was kept.
    #[error("no subscription for pattern {pattern:?} to redrive to; the dead letter was kept")]
    NoSubscriber {
        /// The dead letter's pattern.
        pattern: String,
    },
    /// A replay could not place an event: its shard stayed full (at once when the replay runs in
    /// a handler on that shard's own worker, which alone could make room). Once there is room,
    /// [`Broker::replay`](crate::Broker::replay) from `resume_from` goes on with the same replay,
    /// from that event on (a replay from a time still leaves out the events created before it).
    #[error("replay stopped after {replayed} events: a shard stayed full")]
    ReplayFull {
        /// Events replayed before it stopped.
        replayed: u64,
        /// Where to resume.
        resume_from: crate::ReplayCursor,
    },
    /// A replay stopped on a provider error while reading the stored events (a server that went
    /// away, say). The events before `resume_from` were placed in the shards, and are handled as
    /// any are; [`Broker::replay`](crate::Broker::replay) from `resume_from` goes on with the
    /// same replay once the provider answers again, without placing any of them twice.
    #[error("replay stopped after {replayed} events on a provider error: {error}")]
    ReplayInterrupted {
        /// Events replayed before it stopped.
        replayed: u64,
        /// Where to resume.
        resume_from: crate::ReplayCursor,
        /// The provider's error (boxed: it would double the size of every `BrokerError`).
        #[source]
        error: Box<ProviderError>,
    },
    /// The pattern given does not parse.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// The broker is shut down.
    #[error("the broker is shut down")]
    Closed,
}

/// Why [`Broker::drain`](crate::Broker::drain) could not confirm that everything accepted before it
/// was handled and written.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::{Broker, DrainError};
///
/// let broker = Broker::builder().build()?;
/// let _ = broker.shutdown(Duration::from_secs(5));
/// assert!(matches!(broker.drain(Duration::from_secs(1)), Err(DrainError::Closed)));
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DrainError {
    /// The timeout passed with events accepted before the call still queued or being handled, or
    /// with deliveries waiting for a retry or an acknowledgement.
    #[error(
        "not drained within {timeout:?}: {unfinished} events accepted before the call are unfinished, \
         {retrying} deliveries wait for a retry or an acknowledgement"
    )]
    TimedOut {
        /// The timeout given.
        timeout: Duration,
        /// Events accepted before the call that had not ended (completed, or failed and
        /// dead-lettered), synchronous publishes and redrives begun before it still running
        /// included.
        unfinished: u64,
        /// Deliveries waiting for a retry, or for their consumer to settle them (see
        /// [`Broker::subscribe_acked`](crate::Broker::subscribe_acked)), at the timeout; each
        /// holds its event unfinished.
        retrying: u64,
    },
    /// Every event was handled, but the provider writer did not confirm their statuses, dead
    /// letters and acknowledgements: see the inner error.
    #[error("every event was handled, but their writes were not confirmed: {0}")]
    Write(#[source] BrokerError),
    /// Called from a handler of this broker: the handler's own worker, or the synchronous publish
    /// or redrive running it, could never finish.
    #[error("drain was called from a handler of the same broker, which would wait for itself")]
    InHandler,
    /// The broker is shut down, or shut down while draining.
    #[error("the broker is shut down")]
    Closed,
    /// Called through [`eventbroker::drain`](crate::drain) before
    /// [`eventbroker::init`](crate::init).
    #[error("no default broker: call eventbroker::init first")]
    NotInitialized,
}

/// What [`BrokerError::Timeout`] says: a wait of no time at all is a deadline already passed.
fn writer_timeout(waited: Duration) -> String {
    if waited.is_zero() {
        "the provider writer was not flushed: the deadline had passed".to_owned()
    } else {
        format!("the provider writer did not finish within {waited:?}")
    }
}
