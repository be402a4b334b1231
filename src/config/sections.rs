//! The provider sections of the configuration (`redis`, `nats`, `database`), parsed and checked
//! whatever provider features are compiled. Unset fields mean the provider's own default.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::reader::Section;
use crate::error::ConfigError;
use crate::redact::{mask, redact_url, redact_url_list};

/// The keys of the sections that hold a secret as a whole (`redis.password`, `nats.token`, ...):
/// errors do not quote their values, `Debug` shows `***` for them.
pub(super) const SECRET_KEYS: [&str; 3] = ["password", "token", "nkey"];

/// The `redis` section: the seed's keys (`host`, `port`, `stream_name`, `consumer_group`) and the
/// Redis Streams provider's settings. Unset fields take the provider's defaults.
///
/// ```
/// use eventbroker::config::Config;
///
/// # #[cfg(feature = "yaml")] {
/// let config = Config::from_yaml_str(
///     "event_broker:\n  provider: redis\n  redis:\n    host: cache.internal\n    port: 6380\n",
/// )?;
/// assert_eq!(config.redis.url().as_deref(), Some("redis://cache.internal:6380/0"));
/// # }
/// # Ok::<(), eventbroker::ConfigError>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisSection {
    /// `redis://[user][:password@]host[:port][/db]` or `rediss://…`; when set, `host`, `port`,
    /// `username`, `password`, `db` and `tls` must not be. When neither it nor a part is set, the
    /// provider's default (`redis://127.0.0.1:6379`).
    pub url: Option<String>,
    /// Default `localhost`.
    pub host: Option<String>,
    /// Default 6379.
    pub port: Option<u16>,
    /// ACL user name; default none.
    pub username: Option<String>,
    /// Default none.
    pub password: Option<String>,
    /// Database number; default 0.
    pub db: Option<u32>,
    /// Connect with TLS (`rediss://`); default `false`.
    pub tls: Option<bool>,
    /// The stream's name (under `key_prefix`); the provider's default is `events`.
    pub stream_name: Option<String>,
    /// What every key starts with; the provider's default is `eventbroker`.
    pub key_prefix: Option<String>,
    /// The seed's key: the group shared by `distribution: work_queue` instances, unless
    /// `distribution.group` names one. Fan-out instances each have a group named by their
    /// instance id, and do not use it.
    pub consumer_group: Option<String>,
    /// Most stream entries kept (0: all); the provider's default is 100 000.
    pub max_len: Option<usize>,
    /// How long a finished event is kept (`none`: until trimmed); the provider's default is 7 days.
    pub status_ttl: Option<Option<Duration>>,
    /// Most dead letters kept; the provider's default is 100 000.
    pub max_dead_letters: Option<usize>,
    /// Bound of each connect, read and write; the provider's default is 5 s.
    pub timeout: Option<Duration>,
    /// The connections' `CLIENT SETNAME`; the provider's default is `eventbroker`.
    pub client_name: Option<String>,
}

impl RedisSection {
    /// The URL to connect to: `url`, or one built from `host`, `port`, `username`, `password`,
    /// `db` and `tls` when any is set (the user name and password percent-encoded, an IPv6 host
    /// in brackets); `None` leaves the provider's default.
    pub fn url(&self) -> Option<String> {
        if let Some(url) = &self.url {
            return Some(url.clone());
        }
        if !self.has_address_parts() {
            return None;
        }
        let scheme = if self.tls == Some(true) { "rediss" } else { "redis" };
        let auth = match (&self.username, &self.password) {
            (None, None) => String::new(),
            (user, password) => format!(
                "{}{}@",
                user.as_deref().map(percent_encode).unwrap_or_default(),
                password.as_deref().map(|p| format!(":{}", percent_encode(p))).unwrap_or_default()
            ),
        };
        let host = url_host(self.host.as_deref().unwrap_or("localhost"));
        Some(format!("{scheme}://{auth}{host}:{}/{}", self.port.unwrap_or(6379), self.db.unwrap_or(0)))
    }

    /// Whether any of `host`, `port`, `username`, `password`, `db` or `tls` is set.
    fn has_address_parts(&self) -> bool {
        self.host.is_some()
            || self.port.is_some()
            || self.username.is_some()
            || self.password.is_some()
            || self.db.is_some()
            || self.tls.is_some()
    }

    pub(super) fn read(s: &mut Section<'_, '_>) -> Result<Self, ConfigError> {
        let section = Self {
            url: s.string("url")?,
            host: s.string("host")?,
            port: s.uint("port")?,
            username: s.string("username")?,
            password: s.string("password")?,
            db: s.uint("db")?,
            tls: s.bool("tls")?,
            stream_name: s.string("stream_name")?,
            key_prefix: s.string("key_prefix")?,
            consumer_group: s.string("consumer_group")?,
            max_len: s.uint("max_len")?,
            status_ttl: s.duration_or_none("status_ttl")?,
            max_dead_letters: s.uint("max_dead_letters")?,
            timeout: s.duration("timeout")?,
            client_name: s.string("client_name")?,
        };
        let parts = [
            ("host", section.host.is_some()),
            ("port", section.port.is_some()),
            ("username", section.username.is_some()),
            ("password", section.password.is_some()),
            ("db", section.db.is_some()),
            ("tls", section.tls.is_some()),
        ];
        check_url(s, section.url.as_deref(), &["redis", "rediss"], &parts, section.port)?;
        for (key, value) in [
            ("stream_name", &section.stream_name),
            ("key_prefix", &section.key_prefix),
            ("client_name", &section.client_name),
        ] {
            if let Some(value) = value {
                check_chars(
                    s,
                    key,
                    value,
                    |c| c.is_ascii_alphanumeric() || "_-.:{}".contains(c),
                    "ASCII letters, digits and _ - . : { }",
                )?;
            }
        }
        if section.timeout == Some(Duration::ZERO) {
            return Err(s.invalid("timeout", "must be above zero"));
        }
        Ok(section)
    }
}

/// Every field as it is but `password` (`Some("***")` when set) and `url` (its credentials blanked).
impl fmt::Debug for RedisSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so a field added later cannot be left out (or shown) unnoticed.
        let Self {
            url,
            host,
            port,
            username,
            password,
            db,
            tls,
            stream_name,
            key_prefix,
            consumer_group,
            max_len,
            status_ttl,
            max_dead_letters,
            timeout,
            client_name,
        } = self;
        f.debug_struct("RedisSection")
            .field("url", &url.as_deref().map(redact_url))
            .field("host", host)
            .field("port", port)
            .field("username", username)
            .field("password", &mask(password.as_deref()))
            .field("db", db)
            .field("tls", tls)
            .field("stream_name", stream_name)
            .field("key_prefix", key_prefix)
            .field("consumer_group", consumer_group)
            .field("max_len", max_len)
            .field("status_ttl", status_ttl)
            .field("max_dead_letters", max_dead_letters)
            .field("timeout", timeout)
            .field("client_name", client_name)
            .finish()
    }
}

/// Where NATS streams keep their messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsStorageKind {
    /// On disk (`file`): survives a server restart.
    File,
    /// In memory (`memory`).
    Memory,
}

/// The `nats` section: the seed's keys (`url`, `stream_name`) and the JetStream provider's
/// settings. Unset fields take the provider's defaults.
///
/// ```
/// use eventbroker::config::Config;
///
/// # #[cfg(feature = "yaml")] {
/// let config = Config::from_yaml_str(
///     "event_broker:\n  provider: nats\n  nats:\n    url: nats://localhost:4222\n    stream_name: RESOLVESPEC_EVENTS\n",
/// )?;
/// assert_eq!(config.nats.stream_name.as_deref(), Some("RESOLVESPEC_EVENTS"));
/// # }
/// # Ok::<(), eventbroker::ConfigError>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsSection {
    /// Server URL, or several separated by commas; the provider's default is
    /// `nats://127.0.0.1:4222`.
    pub url: Option<String>,
    /// The event stream; the provider's default is `EVENTS`.
    pub stream_name: Option<String>,
    /// Subject prefix of the events; the provider's default is `events`.
    pub subject_prefix: Option<String>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password, with `user`.
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// `NKey` seed authentication.
    pub nkey: Option<String>,
    /// A `.creds` file (user JWT and `NKey` seed).
    pub credentials_file: Option<PathBuf>,
    /// Require TLS; default: only when the URL or the server asks for it.
    pub tls: Option<bool>,
    /// PEM file of extra certificate authorities to trust (turns TLS on).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS, with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// `file` or `memory`; the provider's default is `file`.
    pub storage: Option<NatsStorageKind>,
    /// Stream replicas, 1 to 5; the provider's default is 1.
    pub replicas: Option<usize>,
    /// Age past which the server removes messages (`none`: never); the provider's default is none.
    pub max_age: Option<Option<Duration>>,
    /// Most bytes the event stream holds; the provider's default is no limit.
    pub max_bytes: Option<u64>,
    /// Server-side deduplication window of event ids; the provider's default is 2 minutes.
    pub duplicate_window: Option<Duration>,
    /// Bound of the first connection; the provider's default is 5 s.
    pub connect_timeout: Option<Duration>,
    /// Bound of each server request; the provider's default is 5 s.
    pub request_timeout: Option<Duration>,
    /// The connection's name in the server's monitoring; the provider's default is `eventbroker`.
    pub client_name: Option<String>,
}

impl NatsSection {
    pub(super) fn read(s: &mut Section<'_, '_>) -> Result<Self, ConfigError> {
        let section = Self {
            url: s.string("url")?,
            stream_name: s.string("stream_name")?,
            subject_prefix: s.string("subject_prefix")?,
            user: s.string("user")?,
            password: s.string("password")?,
            token: s.string("token")?,
            nkey: s.string("nkey")?,
            credentials_file: s.string("credentials_file")?.map(PathBuf::from),
            tls: s.bool("tls")?,
            ca_file: s.string("ca_file")?.map(PathBuf::from),
            cert_file: s.string("cert_file")?.map(PathBuf::from),
            key_file: s.string("key_file")?.map(PathBuf::from),
            storage: s.choice("storage", &["file", "memory"])?.map(|c| match c {
                "memory" => NatsStorageKind::Memory,
                _ => NatsStorageKind::File,
            }),
            replicas: s.uint("replicas")?,
            max_age: s.duration_or_none("max_age")?,
            max_bytes: s.uint("max_bytes")?,
            duplicate_window: s.duration("duplicate_window")?,
            connect_timeout: s.duration("connect_timeout")?,
            request_timeout: s.duration("request_timeout")?,
            client_name: s.string("client_name")?,
        };
        if let Some(urls) = &section.url {
            for url in urls.split(',') {
                check_scheme(s, "url", url.trim(), &["nats", "tls", "ws", "wss"])?;
            }
        }
        if let Some(name) = &section.stream_name {
            check_chars(
                s,
                "stream_name",
                name,
                |c| c.is_ascii_alphanumeric() || c == '_' || c == '-',
                "ASCII letters, digits, _ and -",
            )?;
        }
        if let Some(prefix) = &section.subject_prefix {
            let valid = prefix.split('.').all(|t| !t.is_empty() && !t.contains(['*', '>', ' ']));
            if !valid {
                return Err(s.invalid(
                    "subject_prefix",
                    format!("{prefix:?} is not a subject prefix (dot-separated tokens, no wildcards)"),
                ));
            }
        }
        let auths = [
            ("user", section.user.is_some()),
            ("token", section.token.is_some()),
            ("nkey", section.nkey.is_some()),
            ("credentials_file", section.credentials_file.is_some()),
        ];
        if auths.iter().filter(|(_, set)| *set).count() > 1 {
            return Err(
                s.invalid("user", "set one way to authenticate: user, token, nkey or credentials_file")
            );
        }
        if section.user.is_some() != section.password.is_some() {
            return Err(s.invalid("password", "user and password go together"));
        }
        if section.cert_file.is_some() != section.key_file.is_some() {
            return Err(s.invalid("key_file", "cert_file and key_file go together"));
        }
        if let Some(replicas) = section.replicas {
            if !(1..=5).contains(&replicas) {
                return Err(s.invalid("replicas", format!("must be between 1 and 5, got {replicas}")));
            }
        }
        Ok(section)
    }
}

/// Every field as it is but `password`, `token` and `nkey` (`Some("***")` when set) and `url` (the
/// credentials of each server blanked).
impl fmt::Debug for NatsSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so a field added later cannot be left out (or shown) unnoticed.
        let Self {
            url,
            stream_name,
            subject_prefix,
            user,
            password,
            token,
            nkey,
            credentials_file,
            tls,
            ca_file,
            cert_file,
            key_file,
            storage,
            replicas,
            max_age,
            max_bytes,
            duplicate_window,
            connect_timeout,
            request_timeout,
            client_name,
        } = self;
        f.debug_struct("NatsSection")
            .field("url", &url.as_deref().map(redact_url_list))
            .field("stream_name", stream_name)
            .field("subject_prefix", subject_prefix)
            .field("user", user)
            .field("password", &mask(password.as_deref()))
            .field("token", &mask(token.as_deref()))
            .field("nkey", &mask(nkey.as_deref()))
            .field("credentials_file", credentials_file)
            .field("tls", tls)
            .field("ca_file", ca_file)
            .field("cert_file", cert_file)
            .field("key_file", key_file)
            .field("storage", storage)
            .field("replicas", replicas)
            .field("max_age", max_age)
            .field("max_bytes", max_bytes)
            .field("duplicate_window", duplicate_window)
            .field("connect_timeout", connect_timeout)
            .field("request_timeout", request_timeout)
            .field("client_name", client_name)
            .finish()
    }
}

/// The `database` section: the seed's keys (`table_name`, `channel`) and the PostgreSQL
/// provider's settings. Unset fields take the provider's defaults.
///
/// ```
/// use eventbroker::config::Config;
///
/// # #[cfg(feature = "yaml")] {
/// let config = Config::from_yaml_str(
///     "event_broker:\n  provider: database\n  database:\n    table_name: events\n    channel: resolvespec_events\n",
/// )?;
/// assert_eq!(config.database.table_name.as_deref(), Some("events"));
/// # }
/// # Ok::<(), eventbroker::ConfigError>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatabaseSection {
    /// `postgres://user:password@host:port/dbname?...`, or libpq's `host=… port=… dbname=…`;
    /// when set, `host`, `port`, `user`, `password` and `dbname` must not be. When neither it nor
    /// a part is set, the provider's default (`postgresql://postgres@127.0.0.1:5432/postgres`).
    pub url: Option<String>,
    /// Default `localhost`.
    pub host: Option<String>,
    /// Default 5432.
    pub port: Option<u16>,
    /// Default `postgres`.
    pub user: Option<String>,
    /// Default none.
    pub password: Option<String>,
    /// Default `postgres`.
    pub dbname: Option<String>,
    /// Schema of the tables, created when missing; the provider's default is `eventbroker`.
    pub schema: Option<String>,
    /// The events table; the provider's default is `events`.
    pub table_name: Option<String>,
    /// The `LISTEN`/`NOTIFY` channel; the provider's default is `<schema>_<table>`.
    pub channel: Option<String>,
    /// Connections in the pool; the provider's default is 4.
    pub pool_size: Option<usize>,
    /// How often readers poll besides waking on `NOTIFY`; the provider's default is 250 ms.
    pub poll_interval: Option<Duration>,
    /// Age past which finished events are deleted (`none`: never); the provider's default is
    /// 24 hours.
    pub max_age: Option<Option<Duration>>,
    /// Bound of a connection attempt; the provider's default is 5 s.
    pub connect_timeout: Option<Duration>,
    /// Bound of each statement; the provider's default is 10 s.
    pub operation_timeout: Option<Duration>,
    /// `application_name` of the connections; the provider's default is `eventbroker`.
    pub application_name: Option<String>,
}

impl DatabaseSection {
    /// The URL to connect to: `url`, or one built from `host`, `port`, `user`, `password` and
    /// `dbname` when any is set (percent-encoded, an IPv6 host in brackets, a socket directory
    /// as PostgreSQL reads it); `None` leaves the provider's default.
    ///
    /// ```
    /// use eventbroker::config::DatabaseSection;
    ///
    /// let mut section = DatabaseSection::default();
    /// assert_eq!(section.url(), None);
    /// section.dbname = Some("app".into());
    /// assert_eq!(section.url().as_deref(), Some("postgres://postgres@localhost:5432/app"));
    /// ```
    pub fn url(&self) -> Option<String> {
        if let Some(url) = &self.url {
            return Some(url.clone());
        }
        if !self.has_address_parts() {
            return None;
        }
        let password =
            self.password.as_deref().map(|p| format!(":{}", percent_encode(p))).unwrap_or_default();
        Some(format!(
            "postgres://{}{password}@{}:{}/{}",
            percent_encode(self.user.as_deref().unwrap_or("postgres")),
            url_host(self.host.as_deref().unwrap_or("localhost")),
            self.port.unwrap_or(5432),
            percent_encode(self.dbname.as_deref().unwrap_or("postgres")),
        ))
    }

    /// Whether any of `host`, `port`, `user`, `password` or `dbname` is set.
    fn has_address_parts(&self) -> bool {
        self.host.is_some()
            || self.port.is_some()
            || self.user.is_some()
            || self.password.is_some()
            || self.dbname.is_some()
    }

    pub(super) fn read(s: &mut Section<'_, '_>) -> Result<Self, ConfigError> {
        let section = Self {
            url: s.string("url")?,
            host: s.string("host")?,
            port: s.uint("port")?,
            user: s.string("user")?,
            password: s.string("password")?,
            dbname: s.string("dbname")?,
            schema: s.string("schema")?,
            table_name: s.string("table_name")?,
            channel: s.string("channel")?,
            pool_size: s.uint("pool_size")?,
            poll_interval: s.duration("poll_interval")?,
            max_age: s.duration_or_none("max_age")?,
            connect_timeout: s.duration("connect_timeout")?,
            operation_timeout: s.duration("operation_timeout")?,
            application_name: s.string("application_name")?,
        };
        let parts = [
            ("host", section.host.is_some()),
            ("port", section.port.is_some()),
            ("user", section.user.is_some()),
            ("password", section.password.is_some()),
            ("dbname", section.dbname.is_some()),
        ];
        // libpq's `key=value` form (`host=db port=5432 dbname=app`) is a URL here too.
        let url = section.url.as_deref().filter(|url| url.contains("://") || !url.contains('='));
        check_url(s, url, &["postgres", "postgresql"], &parts, section.port)?;
        if url.is_none() && section.url.is_some() && section.has_address_parts() {
            return Err(s.invalid("host", "set either url or its parts (host, port, ...), not both"));
        }
        // The provider names its other tables after the events table, adding up to 13 bytes
        // (`_dead_letters`) within PostgreSQL's 63.
        for (key, value, max) in [
            ("schema", &section.schema, 63),
            ("table_name", &section.table_name, 50),
            ("channel", &section.channel, 63),
        ] {
            if let Some(value) = value {
                check_identifier(s, key, value, max)?;
            }
        }
        if section.pool_size == Some(0) {
            return Err(s.invalid("pool_size", "must be at least 1"));
        }
        Ok(section)
    }
}

/// Every field as it is but `password` (`Some("***")` when set) and `url` (its password blanked, in
/// either form).
impl fmt::Debug for DatabaseSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so a field added later cannot be left out (or shown) unnoticed.
        let Self {
            url,
            host,
            port,
            user,
            password,
            dbname,
            schema,
            table_name,
            channel,
            pool_size,
            poll_interval,
            max_age,
            connect_timeout,
            operation_timeout,
            application_name,
        } = self;
        f.debug_struct("DatabaseSection")
            .field("url", &url.as_deref().map(redact_url))
            .field("host", host)
            .field("port", port)
            .field("user", user)
            .field("password", &mask(password.as_deref()))
            .field("dbname", dbname)
            .field("schema", schema)
            .field("table_name", table_name)
            .field("channel", channel)
            .field("pool_size", pool_size)
            .field("poll_interval", poll_interval)
            .field("max_age", max_age)
            .field("connect_timeout", connect_timeout)
            .field("operation_timeout", operation_timeout)
            .field("application_name", application_name)
            .finish()
    }
}

/// `text` with every byte but the URL-safe ones (letters, digits, `-`, `.`, `_`, `~`)
/// percent-encoded, as a user name, password, database name or socket path goes into a URL: the
/// Redis and PostgreSQL clients decode them, so `p@ss/w#rd` arrives as it was written.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A host as a URL writes it: an IPv6 address in brackets, a Unix socket directory
/// (PostgreSQL's `/var/run/postgresql`) percent-encoded, a name as it is.
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else if host.contains('/') {
        percent_encode(host)
    } else {
        host.to_owned()
    }
}

/// A section takes either a `url` with one of `schemes`, or its `parts` (which ones are set), and a
/// port that is not 0.
fn check_url(
    s: &Section<'_, '_>,
    url: Option<&str>,
    schemes: &[&str],
    parts: &[(&str, bool)],
    port: Option<u16>,
) -> Result<(), ConfigError> {
    if let Some(url) = url {
        check_scheme(s, "url", url, schemes)?;
        if let Some((key, _)) = parts.iter().find(|(_, set)| *set) {
            return Err(s.invalid(key, "set either url or its parts (host, port, ...), not both"));
        }
    }
    if port == Some(0) {
        return Err(s.invalid("port", "must be between 1 and 65535, got 0"));
    }
    Ok(())
}

fn check_scheme(s: &Section<'_, '_>, key: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if scheme.is_some_and(|scheme| schemes.contains(&scheme)) {
        return Ok(());
    }
    let expected: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
    let url = redact_url(url);
    Err(s.invalid(key, format!("expected a URL starting with {}, got {url:?}", expected.join(" or "))))
}

fn check_chars(
    s: &Section<'_, '_>,
    key: &str,
    value: &str,
    allowed: impl Fn(char) -> bool,
    described: &str,
) -> Result<(), ConfigError> {
    if value.chars().all(allowed) {
        Ok(())
    } else {
        Err(s.invalid(key, format!("{value:?} has characters other than {described}")))
    }
}

/// A PostgreSQL identifier the provider can use unquoted: a letter or `_`, then letters, digits
/// or `_`, at most `max` bytes.
fn check_identifier(s: &Section<'_, '_>, key: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    let mut chars = value.chars();
    let valid = value.len() <= max
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(s.invalid(
            key,
            format!(
                "{value:?} is not an identifier (a letter or _, then letters, digits or _, at most {max} bytes)"
            ),
        ))
    }
}
