//! Errors, one type per failure a caller can act on.
//!
//! Construction errors describe the input and where it went wrong
//! (`invalid pattern "us*rs" at byte 2: wildcard '*' mixed into a segment`). Errors on the publish
//! hot path are small enums that hand the event back, so nothing the caller owned is lost.

use std::error::Error as StdError;

/// A boxed error from a dependency, kept as the `source` of one of ours.
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
    /// The backend cannot be reached or refused the request; trying again later may succeed.
    #[error("the backend is unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (a bad filter, an invalid identifier); retrying cannot help.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// Any other failure reported by the backend.
    #[error("{0}")]
    Backend(String),
}

/// A provider operation that failed: which provider, which operation, and why.
///
/// ```
/// use eventbroker::{ProviderError, ProviderErrorKind};
///
/// let err = ProviderError::new("memory", "store_batch", ProviderErrorKind::Closed);
/// assert_eq!(err.to_string(), "memory provider: store_batch failed: the provider is closed");
/// assert!(!err.is_transient());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{provider} provider: {operation} failed: {kind}")]
pub struct ProviderError {
    provider: &'static str,
    operation: &'static str,
    kind: ProviderErrorKind,
    #[source]
    source: Option<BoxError>,
}

impl ProviderError {
    /// An error of `provider` (its name, e.g. `"redis"`) in `operation` (e.g. `"store_batch"`).
    pub fn new(provider: &'static str, operation: &'static str, kind: ProviderErrorKind) -> Self {
        Self { provider, operation, kind, source: None }
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
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

    /// Whether retrying the same request later may succeed. The provider writer retries transient
    /// errors with backoff and reports the rest at once.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ProviderErrorKind::Unavailable(_) | ProviderErrorKind::Backend(_))
    }
}
