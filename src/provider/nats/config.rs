//! Settings of a [`NatsProvider`](super::NatsProvider): the connection, the stream layout and the
//! limits every call runs under.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ConfigError;
use crate::redact::{MASK, redact_url_list};

/// How the provider authenticates to the server.
///
/// `Debug` never shows a secret.
///
/// ```
/// use eventbroker::provider::nats::NatsAuth;
///
/// let auth = NatsAuth::UserPassword { user: "svc".into(), password: "s3cret".into() };
/// assert!(!format!("{auth:?}").contains("s3cret"));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials, or those in the URL: `nats://user:password@host`, `nats://token@host`
    /// (percent-encoded), the same for every server of the list.
    #[default]
    None,
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token.
    Token(String),
    /// An `NKey` seed (`SU…`); the server is sent the public key and a signed nonce.
    NKey(String),
    /// A `.creds` file with a user JWT and its `NKey` seed (operator mode).
    CredentialsFile(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => {
                f.debug_struct("UserPassword").field("user", user).field("password", &MASK).finish()
            }
            Self::Token(_) => f.debug_tuple("Token").field(&MASK).finish(),
            Self::NKey(_) => f.debug_tuple("NKey").field(&MASK).finish(),
            Self::CredentialsFile(path) => f.debug_tuple("CredentialsFile").field(path).finish(),
        }
    }
}

/// TLS settings. A `tls://` URL, or a server that requires TLS, turns TLS on as well.
///
/// ```
/// use eventbroker::provider::nats::NatsTls;
///
/// let tls = NatsTls {
///     root_certificates: Some("/etc/nats/ca.pem".into()),
///     client_certificate: Some(("/etc/nats/client.pem".into(), "/etc/nats/client-key.pem".into())),
///     ..NatsTls::default()
/// };
/// assert!(tls.required);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTls {
    /// Refuse to connect without TLS. Default `true`.
    pub required: bool,
    /// PEM file of the certificate authorities to trust, in addition to the system's.
    pub root_certificates: Option<PathBuf>,
    /// PEM files of a client certificate and its private key, for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    /// Start the TLS handshake before the server's `INFO` (servers with `handshake_first`).
    pub handshake_first: bool,
}

impl Default for NatsTls {
    fn default() -> Self {
        Self { required: true, root_certificates: None, client_certificate: None, handshake_first: false }
    }
}

/// Where the stream keeps its messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NatsStorage {
    /// On disk: survives a server restart. Default.
    #[default]
    File,
    /// In memory: faster, lost when the server restarts.
    Memory,
}

/// Settings of a [`NatsProvider`](super::NatsProvider).
///
/// The provider lays out four things on the server, each named from [`stream_name`] and
/// [`subject_prefix`]:
///
/// | what | name | subjects |
/// |---|---|---|
/// | the events | stream `<stream_name>` | `<subject_prefix>.<type>` |
/// | their statuses | KV bucket `<stream_name>_STATUS` (stream `KV_<stream_name>_STATUS`) | `$KV.<stream_name>_STATUS.<id>` |
/// | dead letters | stream `<stream_name>_DLQ` | `<subject_prefix>_dlq.<letter id>` |
/// | consumer groups | durable consumers on the event stream | — |
///
/// ```
/// use std::time::Duration;
/// use eventbroker::provider::nats::{NatsAuth, NatsConfig};
///
/// let config = NatsConfig {
///     stream_name: "ORDERS".into(),
///     subject_prefix: "orders".into(),
///     max_age: Some(Duration::from_secs(7 * 24 * 3600)),
///     auth: NatsAuth::Token("t0k3n".into()),
///     ..NatsConfig::new("nats://127.0.0.1:4222")
/// };
/// config.validate()?;
/// assert_eq!(config.status_bucket(), "ORDERS_STATUS");
/// assert_eq!(config.dead_letter_stream(), "ORDERS_DLQ");
/// # Ok::<(), eventbroker::ConfigError>(())
/// ```
///
/// `Debug` never shows a secret: neither [`auth`](NatsConfig::auth)'s nor one in the URL.
///
/// [`stream_name`]: NatsConfig::stream_name
/// [`subject_prefix`]: NatsConfig::subject_prefix
#[derive(Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (`nats://a:4222,nats://b:4222`). Default
    /// `nats://127.0.0.1:4222`.
    pub url: String,
    /// Credentials. Default none.
    pub auth: NatsAuth,
    /// TLS settings; `None` uses TLS only when the URL or the server asks for it.
    pub tls: Option<NatsTls>,
    /// The name the connection shows in the server's monitoring. Default `eventbroker`.
    pub client_name: String,
    /// The event stream. Default `EVENTS`.
    pub stream_name: String,
    /// The subject prefix of the events (one or more tokens). Default `events`.
    pub subject_prefix: String,
    /// Storage of all three streams. Default [`NatsStorage::File`].
    pub storage: NatsStorage,
    /// Replicas of all three streams (1 to 5; more than 1 needs a cluster). Default 1.
    pub replicas: usize,
    /// Messages older than this are removed by the server, from all three streams. Default `None`
    /// (kept until `max_bytes`).
    pub max_age: Option<Duration>,
    /// Most bytes the event stream holds; the oldest messages go first. Default `None` (no limit).
    pub max_bytes: Option<u64>,
    /// How long the server remembers event ids to drop a second store of the same id. Default
    /// 2 minutes. See the module docs for what a store of an id older than this does.
    pub duplicate_window: Duration,
    /// How long the first connection may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Upper bound of each server request and of the wait for a publish acknowledgement; a call
    /// that needs several round trips gets a multiple of it. Default 5 s.
    pub request_timeout: Duration,
    /// Longest wait between reconnection attempts (the delay doubles from 100 ms up to this).
    /// Default 5 s.
    pub reconnect_max_delay: Duration,
    /// Publishes sent and not yet acknowledged, at most, while a batch is written. Default 1024.
    pub max_in_flight: usize,
    /// Events a consumer group may have handed out and not yet acknowledged (the consumer's
    /// `max_ack_pending`). Default 20 000.
    pub max_ack_pending: usize,
    /// How far before the requested time a replay by time starts reading the stream, to catch
    /// events whose `created_at` is earlier than when the server stored them (clock skew between
    /// publishers and the server, batching delays). Default 1 minute.
    pub replay_time_slack: Duration,
    /// Longest pause between two pull requests of a fetch that is waiting for events: the most
    /// an event published to an idle consumer group waits before it is fetched. Default 20 ms.
    pub fetch_poll_interval: Duration,
    /// Status records this provider handle remembers (with their revision) to update them without
    /// reading them first. Default 65 536; 0 reads every record before updating it.
    pub status_cache: usize,
    /// Worker threads of the provider's own runtime (1 or 2). Default 1.
    pub runtime_threads: usize,
}

impl NatsConfig {
    /// The defaults, connecting to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Self::default() }
    }

    /// The KV bucket of the statuses: `<stream_name>_STATUS`.
    pub fn status_bucket(&self) -> String {
        format!("{}_STATUS", self.stream_name)
    }

    /// The dead-letter stream: `<stream_name>_DLQ`.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.stream_name)
    }

    /// The subject prefix of the dead letters: `<subject_prefix>_dlq`.
    pub fn dead_letter_prefix(&self) -> String {
        format!("{}_dlq", self.subject_prefix)
    }

    /// Checks every setting, naming the first bad one by its key (`nats.stream_name`).
    ///
    /// ```
    /// use eventbroker::NatsConfig;
    ///
    /// let bad = NatsConfig { stream_name: "my.events".into(), ..NatsConfig::default() };
    /// let err = bad.validate().unwrap_err();
    /// assert_eq!(err.key(), "nats.stream_name");
    /// ```
    ///
    /// # Errors
    /// [`ConfigError`] for an empty URL, a stream name or subject prefix NATS would refuse or
    /// misread (see [`NatsConfig::stream_name`]), a zero timeout or window, replicas outside 1–5,
    /// runtime threads outside 1–2.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.trim().is_empty() {
            return Err(ConfigError::new("nats.url", "must name at least one server"));
        }
        validate_name("nats.stream_name", &self.stream_name)?;
        validate_prefix("nats.subject_prefix", &self.subject_prefix)?;
        if !(1..=5).contains(&self.replicas) {
            return Err(ConfigError::new("nats.replicas", format!("must be 1 to 5, got {}", self.replicas)));
        }
        if !(1..=2).contains(&self.runtime_threads) {
            return Err(ConfigError::new(
                "nats.runtime_threads",
                format!("must be 1 or 2, got {}", self.runtime_threads),
            ));
        }
        for (key, value) in [
            ("nats.duplicate_window", self.duplicate_window),
            ("nats.connect_timeout", self.connect_timeout),
            ("nats.request_timeout", self.request_timeout),
            ("nats.reconnect_max_delay", self.reconnect_max_delay),
            ("nats.fetch_poll_interval", self.fetch_poll_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(key, "must be longer than zero"));
            }
        }
        if self.max_age.is_some_and(|age| age < self.duplicate_window) {
            return Err(ConfigError::new(
                "nats.max_age",
                format!(
                    "must be at least the duplicate window ({:?}), got {:?}",
                    self.duplicate_window, self.max_age
                ),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::new("nats.max_in_flight", "must be at least 1, got 0"));
        }
        if self.max_ack_pending == 0 || i64::try_from(self.max_ack_pending).is_err() {
            return Err(ConfigError::new(
                "nats.max_ack_pending",
                format!("must be 1 to {}, got {}", i64::MAX, self.max_ack_pending),
            ));
        }
        if self.max_bytes.is_some_and(|bytes| i64::try_from(bytes).is_err()) {
            return Err(ConfigError::new("nats.max_bytes", format!("must be at most {}", i64::MAX)));
        }
        Ok(())
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            auth: NatsAuth::None,
            tls: None,
            client_name: "eventbroker".to_owned(),
            stream_name: "EVENTS".to_owned(),
            subject_prefix: "events".to_owned(),
            storage: NatsStorage::File,
            replicas: 1,
            max_age: None,
            max_bytes: None,
            duplicate_window: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            reconnect_max_delay: Duration::from_secs(5),
            max_in_flight: 1024,
            max_ack_pending: 20_000,
            replay_time_slack: Duration::from_secs(60),
            fetch_poll_interval: Duration::from_millis(20),
            status_cache: 65_536,
            runtime_threads: 1,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so a field added later cannot be left out (or shown) unnoticed.
        let Self {
            url,
            auth,
            tls,
            client_name,
            stream_name,
            subject_prefix,
            storage,
            replicas,
            max_age,
            max_bytes,
            duplicate_window,
            connect_timeout,
            request_timeout,
            reconnect_max_delay,
            max_in_flight,
            max_ack_pending,
            replay_time_slack,
            fetch_poll_interval,
            status_cache,
            runtime_threads,
        } = self;
        f.debug_struct("NatsConfig")
            .field("url", &redact_url_list(url))
            .field("auth", auth)
            .field("tls", tls)
            .field("client_name", client_name)
            .field("stream_name", stream_name)
            .field("subject_prefix", subject_prefix)
            .field("storage", storage)
            .field("replicas", replicas)
            .field("max_age", max_age)
            .field("max_bytes", max_bytes)
            .field("duplicate_window", duplicate_window)
            .field("connect_timeout", connect_timeout)
            .field("request_timeout", request_timeout)
            .field("reconnect_max_delay", reconnect_max_delay)
            .field("max_in_flight", max_in_flight)
            .field("max_ack_pending", max_ack_pending)
            .field("replay_time_slack", replay_time_slack)
            .field("fetch_poll_interval", fetch_poll_interval)
            .field("status_cache", status_cache)
            .field("runtime_threads", runtime_threads)
            .finish()
    }
}

/// Longest stream name accepted: the server stores streams in directories of that name, with room
/// left for the `_STATUS` / `_DLQ` suffixes and the `KV_` prefix.
const MAX_NAME: usize = 200;

/// Whether `byte` may appear in a stream, bucket or consumer name, or a subject prefix token.
pub(super) const fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// A stream name: 1 to 200 bytes of ASCII letters, digits, `-` and `_`.
fn validate_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ConfigError::new(key, format!("must be 1 to {MAX_NAME} bytes, got {}", name.len())));
    }
    if let Some(bad) = name.bytes().find(|&b| !is_name_byte(b)) {
        return Err(ConfigError::new(
            key,
            format!("{name:?} contains {:?}; use ASCII letters, digits, '-' and '_'", char::from(bad)),
        ));
    }
    Ok(())
}

/// A subject prefix: dot-separated tokens, each a valid name; no wildcards, no `$` (reserved).
fn validate_prefix(key: &str, prefix: &str) -> Result<(), ConfigError> {
    if prefix.is_empty() || prefix.len() > MAX_NAME {
        return Err(ConfigError::new(key, format!("must be 1 to {MAX_NAME} bytes, got {}", prefix.len())));
    }
    for token in prefix.split('.') {
        if token.is_empty() {
            return Err(ConfigError::new(key, format!("{prefix:?} has an empty token")));
        }
        if let Some(bad) = token.bytes().find(|&b| !is_name_byte(b)) {
            return Err(ConfigError::new(
                key,
                format!(
                    "{prefix:?} contains {:?}; tokens use ASCII letters, digits, '-' and '_'",
                    char::from(bad)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(change: impl FnOnce(&mut NatsConfig)) -> Result<(), ConfigError> {
        let mut config = NatsConfig::default();
        change(&mut config);
        config.validate()
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let config = NatsConfig::default();
        config.validate().expect("defaults are valid");
        assert_eq!(config.url, "nats://127.0.0.1:4222");
        assert_eq!((config.stream_name.as_str(), config.subject_prefix.as_str()), ("EVENTS", "events"));
        assert_eq!(config.duplicate_window, Duration::from_secs(120));
        assert_eq!(config.request_timeout, Duration::from_secs(5));
        assert_eq!(config.max_in_flight, 1024);
        assert_eq!(
            (config.status_bucket().as_str(), config.dead_letter_stream().as_str()),
            ("EVENTS_STATUS", "EVENTS_DLQ")
        );
        assert_eq!(config.dead_letter_prefix(), "events_dlq");
    }

    #[test]
    fn every_bad_setting_is_named() {
        let key = |r: Result<(), ConfigError>| r.expect_err("invalid").key().to_owned();
        assert_eq!(key(with(|c| c.url = " ".into())), "nats.url");
        assert_eq!(key(with(|c| c.stream_name = "a.b".into())), "nats.stream_name");
        assert_eq!(key(with(|c| c.stream_name = "a b".into())), "nats.stream_name");
        assert_eq!(key(with(|c| c.stream_name = String::new())), "nats.stream_name");
        assert_eq!(key(with(|c| c.stream_name = "x".repeat(201))), "nats.stream_name");
        assert_eq!(key(with(|c| c.subject_prefix = "events.>".into())), "nats.subject_prefix");
        assert_eq!(key(with(|c| c.subject_prefix = "$JS".into())), "nats.subject_prefix");
        assert_eq!(key(with(|c| c.subject_prefix = "a..b".into())), "nats.subject_prefix");
        assert_eq!(key(with(|c| c.replicas = 0)), "nats.replicas");
        assert_eq!(key(with(|c| c.runtime_threads = 3)), "nats.runtime_threads");
        assert_eq!(key(with(|c| c.request_timeout = Duration::ZERO)), "nats.request_timeout");
        assert_eq!(key(with(|c| c.max_age = Some(Duration::from_secs(1)))), "nats.max_age");
        assert_eq!(key(with(|c| c.max_in_flight = 0)), "nats.max_in_flight");
        assert_eq!(key(with(|c| c.max_bytes = Some(u64::MAX))), "nats.max_bytes");
        with(|c| c.subject_prefix = "acme.prod-1.events".into()).expect("multi-token prefix");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        for auth in [
            NatsAuth::UserPassword { user: "u".into(), password: "hunter2".into() },
            NatsAuth::Token("hunter2".into()),
            NatsAuth::NKey("hunter2".into()),
        ] {
            let config = NatsConfig { auth, ..NatsConfig::default() };
            assert!(!format!("{config:?}").contains("hunter2"));
        }
    }

    #[test]
    fn url_credentials_stay_out_of_debug() {
        for url in [
            "nats://u:hunter2@127.0.0.1:4222",
            "nats://hunter2@127.0.0.1:4222",
            "nats://a:4222,tls://u:hunter2@b:4222",
            "hunter2@127.0.0.1:4222",
        ] {
            let shown = format!("{:?}", NatsConfig::new(url));
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("127.0.0.1:4222") || shown.contains("b:4222"), "{shown}");
            assert!(shown.contains("stream_name: \"EVENTS\""), "other fields as before: {shown}");
        }
    }
}
