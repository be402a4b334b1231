//! [`PostgresConfig`]: where the server is, which schema and table the provider owns, and its
//! timeouts, pool, polling and retention.

use std::fmt;
use std::time::Duration;

use super::NAME;
use super::ident::{Ident, MAX_IDENT_LEN};
use super::schema::{Names, SUFFIX_RESERVE};
use crate::error::{ConfigError, ProviderError, ProviderErrorKind};
use crate::redact::redact_url;

/// Settings of a [`PostgresProvider`](super::PostgresProvider).
///
/// Names (`schema`, `table`, `channel`) must be identifiers: ASCII letters, digits and `_`, not
/// starting with a digit, at most 63 bytes (50 for `table`, which gets suffixes). They are used
/// quoted, so case matters. Anything else is refused when the provider connects, with an
/// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput) error naming the setting.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::PostgresConfig;
///
/// let config = PostgresConfig::new("host=127.0.0.1 user=postgres dbname=app")
///     .with_schema("broker")
///     .with_max_age(Some(Duration::from_secs(3600)));
/// assert_eq!(config.table, "events");
/// assert_eq!(config.channel_name(), "broker_events");
/// ```
///
/// `Debug` shows the URL with its password blanked, in either form:
///
/// ```
/// use eventbroker::PostgresConfig;
///
/// let config = PostgresConfig::new("host=127.0.0.1 user=app password=s3cret dbname=app");
/// assert!(format!("{config:?}").contains("user=app password=*** dbname=app"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A libpq-style connection string (`host=127.0.0.1 user=postgres dbname=app`) or URL
    /// (`postgresql://user:secret@127.0.0.1:5432/app`). Default:
    /// `postgresql://postgres@127.0.0.1:5432/postgres`. TLS is not supported: use it on a trusted
    /// network or through a local socket.
    pub url: String,
    /// The schema holding the provider's tables, created when missing. Default `eventbroker`.
    pub schema: String,
    /// The events table; the other tables are named after it (`<table>_claims`, ...). Default
    /// `events`.
    pub table: String,
    /// The `LISTEN`/`NOTIFY` channel; `None` (the default) means `<schema>_<table>`.
    pub channel: Option<String>,
    /// Most pooled connections, each opened on first need. Default 4. Inbound sources listen on
    /// one more connection of their own.
    pub pool_size: usize,
    /// How long connecting may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long any one call may take, waiting for a pooled connection included; past it the call
    /// fails as [`Unavailable`](crate::ProviderErrorKind::Unavailable) and the server cancels the
    /// statement (`statement_timeout`). The server also ends a provider session left idle inside a
    /// transaction this long (`idle_in_transaction_session_timeout`): a stalled provider's locks
    /// go with it. Default 10 s.
    pub operation_timeout: Duration,
    /// How often a waiting inbound fetch looks for events without a notification: the safety net
    /// for wake-ups lost while the listener reconnects, and when naks and claims fall due. Default
    /// 250 ms.
    pub poll_interval: Duration,
    /// Completed and failed events created longer ago than this are deleted. Default 24 hours;
    /// `None` keeps them.
    pub max_age: Option<Duration>,
    /// How often the background cleanup runs. Default 1 minute; `None` runs none (call
    /// [`PostgresProvider::cleanup_now`](super::PostgresProvider::cleanup_now) instead).
    pub cleanup_interval: Option<Duration>,
    /// Most events one cleanup statement deletes; cleanup repeats until fewer are left (or half
    /// the operation timeout has passed: a run, as a whole, takes no longer than that timeout), so
    /// no statement holds locks on more rows than this. Default 5 000.
    pub cleanup_batch: usize,
    /// The `application_name` of every connection, as `pg_stat_activity` shows it. Default
    /// `eventbroker`.
    pub application_name: String,
    /// Worker threads of the provider's runtime, which drives the sockets. Default 1.
    pub runtime_threads: usize,
}

impl PostgresConfig {
    /// Default settings for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Self::default() }
    }

    /// Sets the schema.
    #[must_use]
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the events table.
    #[must_use]
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Sets the notification channel.
    #[must_use]
    pub fn with_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// Sets the retention of completed and failed events.
    #[must_use]
    pub fn with_max_age(mut self, max_age: Option<Duration>) -> Self {
        self.max_age = max_age;
        self
    }

    /// Sets the application name connections report.
    #[must_use]
    pub fn with_application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// The channel in use: [`channel`](Self::channel), or `<schema>_<table>`; where that is
    /// longer than an identifier may be (63 bytes), its first 46 bytes, `_` and 16 hex digits of a
    /// hash of the whole, the same in every instance.
    pub fn channel_name(&self) -> String {
        if let Some(channel) = &self.channel {
            return channel.clone();
        }
        let name = format!("{}_{}", self.schema, self.table);
        if name.len() <= MAX_IDENT_LEN {
            return name;
        }
        let hash = super::schema::stable_hash(&name);
        let keep = (0..=MAX_IDENT_LEN - 17).rev().find(|&at| name.is_char_boundary(at)).unwrap_or(0);
        format!("{}_{hash:016x}", &name[..keep])
    }

    /// Validates the names and numbers, giving the names the provider builds its SQL from.
    pub(super) fn validate(&self) -> Result<Names, ProviderError> {
        const OP: &str = "connect";
        let names = Names {
            schema: Ident::parse("schema", &self.schema, 0).map_err(|e| e.into_provider_error(OP))?,
            table: Ident::parse("table", &self.table, SUFFIX_RESERVE)
                .map_err(|e| e.into_provider_error(OP))?,
            channel: Ident::parse("channel", &self.channel_name(), 0)
                .map_err(|e| e.into_provider_error(OP))?,
        };
        let positive = [
            ("connect_timeout", self.connect_timeout),
            ("operation_timeout", self.operation_timeout),
            ("poll_interval", self.poll_interval),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(invalid_config(OP, ConfigError::new(*key, "must be longer than zero")));
        }
        if self.cleanup_batch == 0 {
            return Err(invalid_config(OP, ConfigError::new("cleanup_batch", "must be at least 1, got 0")));
        }
        Ok(names)
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgresql://postgres@127.0.0.1:5432/postgres".to_owned(),
            schema: "eventbroker".to_owned(),
            table: "events".to_owned(),
            channel: None,
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            max_age: Some(Duration::from_secs(24 * 60 * 60)),
            cleanup_interval: Some(Duration::from_secs(60)),
            cleanup_batch: 5_000,
            application_name: "eventbroker".to_owned(),
            runtime_threads: 1,
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so a field added later cannot be left out (or shown) unnoticed.
        let Self {
            url,
            schema,
            table,
            channel,
            pool_size,
            connect_timeout,
            operation_timeout,
            poll_interval,
            max_age,
            cleanup_interval,
            cleanup_batch,
            application_name,
            runtime_threads,
        } = self;
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(url))
            .field("schema", schema)
            .field("table", table)
            .field("channel", channel)
            .field("pool_size", pool_size)
            .field("connect_timeout", connect_timeout)
            .field("operation_timeout", operation_timeout)
            .field("poll_interval", poll_interval)
            .field("max_age", max_age)
            .field("cleanup_interval", cleanup_interval)
            .field("cleanup_batch", cleanup_batch)
            .field("application_name", application_name)
            .field("runtime_threads", runtime_threads)
            .finish()
    }
}

/// A configuration error as the provider reports it.
pub(super) fn invalid_config(operation: &'static str, error: ConfigError) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::InvalidInput(error.to_string())).with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schema and table whose `<schema>_<table>` passes the identifier limit get a default
    /// channel that fits, the same for every instance, and apart for tables sharing a prefix.
    #[test]
    fn a_default_channel_too_long_for_an_identifier_is_shortened_stably() {
        let schema = "s".repeat(40);
        let config =
            |table: &str| PostgresConfig::new("host=127.0.0.1").with_schema(&schema).with_table(table);
        let (a, b) = (config(&format!("{}a", "t".repeat(29))), config(&format!("{}b", "t".repeat(29))));
        assert_eq!(a.channel_name().len(), MAX_IDENT_LEN);
        assert_eq!(a.channel_name(), a.clone().channel_name(), "stable");
        assert_ne!(a.channel_name(), b.channel_name(), "a hash of the whole name");
        assert!(a.validate().is_ok(), "{:?}", a.validate().err());
        assert_eq!(config("events").channel_name(), format!("{schema}_events"), "short names as they are");
    }

    #[test]
    fn debug_hides_the_password_in_either_form() {
        for url in [
            "postgresql://app:s3cret@127.0.0.1:5432/app",
            "postgres://s3cret@127.0.0.1/app",
            "postgresql://app@127.0.0.1/app?password=s3cret&sslmode=disable",
            "host=127.0.0.1 user=app password=s3cret dbname=app",
            "host=127.0.0.1 password = 'it\\'s s3cret' dbname=app",
        ] {
            let shown = format!("{:?}", PostgresConfig::new(url));
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("127.0.0.1") && shown.contains("app"), "{shown}");
            assert!(shown.contains("schema: \"eventbroker\""), "other fields as before: {shown}");
        }
    }
}
