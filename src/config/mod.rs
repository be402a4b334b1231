//! Configuration: the seed's YAML (`event_broker:`), environment overrides, and the factory that
//! builds a broker and its provider from it.
//!
//! ```yaml
//! event_broker:
//!   enabled: true
//!   provider: memory  # memory, redis, nats, database (or postgres)
//!   mode: async       # sync, async
//!   worker_count: 10
//!   buffer_size: 1000
//!   instance_id: "${HOSTNAME}"
//!   retry_policy:
//!     max_retries: 3
//!     initial_delay: 1s
//!     max_delay: 30s
//!     backoff_factor: 2.0
//! ```
//!
//! ```
//! # #[cfg(feature = "yaml")] {
//! use std::time::Duration;
//! use eventbroker::config::Config;
//!
//! let config = Config::from_yaml_str(r#"
//! event_broker:
//!   provider: memory
//!   mode: async
//!   worker_count: 2
//!   retry_policy:
//!     initial_delay: 250ms
//! "#)?;
//! assert_eq!(config.retry_policy.initial_delay, Duration::from_millis(250));
//! let broker = config.build()?;
//! assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Reading
// Linked only where the feature compiles them; a plain name otherwise.
#![cfg_attr(
    feature = "yaml",
    doc = "- [`Config::from_yaml_str`] and [`Config::from_yaml_file`] (feature `yaml`) read the"
)]
#![cfg_attr(
    not(feature = "yaml"),
    doc = "- `Config::from_yaml_str` and `Config::from_yaml_file` (feature `yaml`) read the"
)]
//!   `event_broker` mapping of a YAML document; the document's other keys are the application's
//!   and are not looked at. [`Config::from_env`] reads the defaults and the overrides alone.
//! - **Expansion**: in the document's string values, `${VAR}` is the variable's value (empty when
//!   unset, as in a shell), `${VAR:-default}` the default when it is unset or empty (a default
//!   may hold `${…}` too: `${REDIS_HOST:-${HOSTNAME}}`), and `$$` a literal `$`. Expansion
//!   happens after parsing, so a value cannot inject YAML. An override's
//!   value (below) is taken as it is, never expanded: the environment already holds what it says.
//! - **Overrides**: `EVENTBROKER_` followed by a key's path in capitals, dots as underscores,
//!   replaces that key: `EVENTBROKER_WORKER_COUNT=4`, `EVENTBROKER_RETRY_POLICY_MAX_RETRIES=0`,
//!   `EVENTBROKER_REDIS_HOST=cache`. A variable under a section's prefix that names no key
//!   (`EVENTBROKER_RETRY_POLICY_MAX_RETRY`) is an error; other `EVENTBROKER_` variables that name
//!   no key are logged and ignored, as other tools use the prefix too.
//!   [`Env::from_vars`] replaces the process environment for both (tests, secrets loaded from
//!   elsewhere), and [`Env::empty`] leaves both out.
//! - **Errors** name the key and the bad value (`event_broker.mode: expected sync or async, got
//!   "asnyc"`), the file it was read from ([`ConfigError::file`]: `invalid configuration in
//!   /etc/app.yaml: …`), and the variable of an override (`… (from EVENTBROKER_MODE)`); a key
//!   nobody reads is an error naming it and the keys that are valid there, never silently ignored.
//! - **Durations** are written as Go writes them: `250ms`, `1s`, `1m30s`, `1.5h` (units `ns`,
//!   `us`, `ms`, `s`, `m`, `h`, and `d` for days); `0` alone is zero. Limits that may be turned off
//!   (`max_age`, `status_ttl`) also take `none`.
//!
//! ## Keys and defaults
//!
//! | key | default | |
//! |---|---|---|
//! | `enabled` | `true` | `false`: [`Config::build`] refuses with [`BuildError::Disabled`]. (The seed defaulted to `false`; here a configuration that is read is meant to be used.) |
//! | `provider` | `memory` | `memory`, `redis`, `nats` or `database` (PostgreSQL; `postgres` and `postgresql` are read as `database`); each but `memory` needs its cargo feature |
//! | `mode` | `async` | `sync` or `async`: what [`Broker::publish`](crate::Broker::publish) does |
//! | `worker_count` | CPUs | shards, one worker thread each, 1 to 1024 (the seed's default was 10) |
//! | `buffer_size` | `1024` | events per shard, rounded up to a power of two (the seed's 1000 becomes 1024) |
//! | `instance_id` | host name | also the durable group of a fan-out instance; empty means the host name |
//! | `retry_policy.max_retries` | `3` | 0 turns retries off |
//! | `retry_policy.initial_delay` | `1s` | |
//! | `retry_policy.max_delay` | `30s` | |
//! | `retry_policy.backoff_factor` | `2.0` | at least 1 |
//! | `retry_policy.jitter` | `0.2` | fraction in `[0, 1]` a delay is randomly shortened by |
//! | `backpressure.policy` | `block` | `block` (wait for room up to `timeout`) or `reject` (hand the event back at once) |
//! | `backpressure.timeout` | `1s` | |
//! | `wait_strategy.kind` | `blocking` | `blocking` (spin, yield, then park), `yielding` or `busy_spin` |
//! | `wait_strategy.spins` | `64` | polls spun before yielding (`blocking`) |
//! | `wait_strategy.yields` | `16` | yields before parking (`blocking`) |
//! | `track_status` | `true` | write every status change to the provider |
//! | `writer.max_batch` | `512` | items per provider write |
//! | `writer.max_delay` | `1ms` | longest a first item waits for its batch |
//! | `writer.max_backlog` | `65536` | stored events unwritten before publishing reports `Full`; as many status changes, dead letters and acknowledgements unwritten before workers take no new events |
//! | `distribution.mode` | `local` with `memory`, else `fan_out` | `local`, `fan_out` or `work_queue` |
//! | `distribution.group` | `redis.consumer_group` (whatever the provider), else required | the shared group of `work_queue` |
//! | `claim_idle` | `30s` | unacknowledged inbound events are redelivered after this |
//! | `prefetch` | 32 per worker in `work_queue`, else what the shards hold | most inbound events held at once |
//! | `ack_timeout` | `30s` | an acknowledged delivery not settled by then fails (at least `1ms`) |
//! | `match_cache_capacity` | `4096` | event types each worker's match cache holds, 1 to 1 048 576 |
//! | `drop_shutdown_timeout` | `30s` | bound of the shutdown that dropping the last handle runs |
//! | `memory.max_events` | `10000` | events kept, least recently used evicted |
//! | `memory.max_age` | `24h` | finished events older than this are removed (`none`: kept) |
//! | `memory.cleanup_interval` | `1m` | above zero (`none`: no cleanup thread) |
//! | `memory.stream_capacity` | `1024` | at least 1 |
//! | `memory.max_dead_letters` | `10000` | |
//! | `metrics.enabled` | with feature `metrics` | record metrics; `true` without the feature is a build error |
//! | `metrics.namespace` | none | prefix of every metric name: `<namespace>_eventbroker_…` |
//! | `metrics.max_types` | `256` | event types with labels of their own; the rest are `other` |
//! | `metrics.timing_sample` | `16` | one event in this many per worker is timed for the duration histogram |
//! | `metrics.report_interval` | `1s` | how often gauges and engine counters are set |
//! | `metrics.labels` | none | labels added to every metric, a mapping (`broker: orders`; values are taken as text); also written `broker=orders,zone=eu`, as the environment variable gives them (which replaces the file's labels, as any override replaces its key) |
//! | `redis.*` | | [`RedisSection`] |
//! | `nats.*` | | [`NatsSection`] |
//! | `database.*` | | [`DatabaseSection`] |
//!
//! ## Building
//! [`Config::build`] makes the provider (the factory: the built-in memory provider, or the
//! Redis, NATS or PostgreSQL provider when its feature is compiled, else
//! [`BuildError::MissingFeature`] naming the feature) and the broker around it.
//! [`Config::builder`] stops one step earlier, for settings only code can give.

use std::time::Duration;

use crate::broker::{Backpressure, Broker, BrokerBuilder, Distribution, Mode};
use crate::dispatch::retry::RetryPolicy;
use crate::dispatch::wait::WaitStrategy;
use crate::dispatch::writer::WriterConfig;
use crate::error::{BuildError, ConfigError};
use crate::metrics::MetricsConfig;
use crate::provider::{InboundConfig, MemoryConfig};

mod env;
mod factory;
mod reader;
mod sections;
#[cfg(feature = "yaml")]
mod yaml;

pub use self::env::Env;
pub use self::sections::{DatabaseSection, NatsSection, NatsStorageKind, RedisSection};

use self::reader::{Node, Reader, Section};

/// Which provider [`Config::build`] makes.
///
/// ```
/// use eventbroker::config::{Config, ProviderKind};
///
/// assert_eq!(Config::default().provider, ProviderKind::Memory);
/// assert_eq!(ProviderKind::Database.as_str(), "database");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderKind {
    /// The built-in [`MemoryProvider`](crate::MemoryProvider) (`memory`).
    #[default]
    Memory,
    /// Redis Streams (`redis`, feature `redis`).
    Redis,
    /// NATS `JetStream` (`nats`, feature `nats`).
    Nats,
    /// PostgreSQL (`database`, feature `postgres`).
    Database,
}

impl ProviderKind {
    /// The name the configuration uses.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
            Self::Nats => "nats",
            Self::Database => "database",
        }
    }
}

/// A broker's configuration: the seed's `event_broker` keys and this crate's own. Every field is
/// public; [`Default`] gives the documented defaults (see the [module docs](self) for the table).
///
/// ```
/// use eventbroker::config::{Config, ProviderKind};
/// use eventbroker::Mode;
///
/// let mut config = Config::default();
/// config.mode = Mode::Sync;
/// config.worker_count = 2;
/// assert_eq!(config.provider, ProviderKind::Memory);
/// let broker = config.build()?;
/// assert_eq!(broker.mode(), Mode::Sync);
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Whether the application wants a broker at all. Default `true`.
    pub enabled: bool,
    /// Which provider to build. Default [`ProviderKind::Memory`].
    pub provider: ProviderKind,
    /// Default [`Mode::Async`].
    pub mode: Mode,
    /// Shards (worker threads). Default: the number of CPUs.
    pub worker_count: usize,
    /// Events per shard, rounded up to a power of two. Default 1024.
    pub buffer_size: usize,
    /// This instance's id; empty means the host name. Default empty.
    pub instance_id: String,
    /// Default [`RetryPolicy::default`].
    pub retry_policy: RetryPolicy,
    /// Default: block up to 1 s.
    pub backpressure: Backpressure,
    /// Default [`WaitStrategy::default`].
    pub wait_strategy: WaitStrategy,
    /// Default `true`.
    pub track_status: bool,
    /// Default [`WriterConfig::default`].
    pub writer: WriterConfig,
    /// `None`: [`Distribution::Local`] with the memory provider, [`Distribution::FanOut`] with the
    /// others.
    pub distribution: Option<Distribution>,
    /// Default 30 s.
    pub claim_idle: Duration,
    /// `None`: [`BrokerBuilder::prefetch`]'s default for the distribution.
    pub prefetch: Option<usize>,
    /// Default 30 s; see [`BrokerBuilder::ack_timeout`].
    pub ack_timeout: Duration,
    /// Default 4096.
    pub match_cache_capacity: usize,
    /// Default 30 s.
    pub drop_shutdown_timeout: Duration,
    /// The memory provider's settings. Default [`MemoryConfig::default`].
    pub memory: MemoryConfig,
    /// The Redis provider's settings.
    pub redis: RedisSection,
    /// The NATS provider's settings.
    pub nats: NatsSection,
    /// The PostgreSQL provider's settings.
    pub database: DatabaseSection,
    /// Default [`MetricsConfig::default`].
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        let builder = BrokerBuilder::default();
        Self {
            enabled: true,
            provider: ProviderKind::Memory,
            mode: builder.mode,
            worker_count: builder.workers,
            buffer_size: builder.buffer_size,
            instance_id: String::new(),
            retry_policy: builder.retry,
            backpressure: builder.backpressure,
            wait_strategy: builder.wait,
            track_status: builder.track_status,
            writer: builder.writer,
            distribution: None,
            claim_idle: InboundConfig::DEFAULT_CLAIM_IDLE,
            prefetch: None,
            ack_timeout: builder.ack_timeout,
            match_cache_capacity: builder.cache_capacity,
            drop_shutdown_timeout: builder.drop_timeout,
            memory: MemoryConfig::default(),
            redis: RedisSection::default(),
            nats: NatsSection::default(),
            database: DatabaseSection::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Config {
    /// Reads the `event_broker` mapping of a YAML document, expanding `${VAR}` and applying
    /// `EVENTBROKER_*` overrides from the process environment.
    ///
    /// ```
    /// use eventbroker::config::Config;
    ///
    /// let config = Config::from_yaml_str("event_broker:\n  mode: sync\n  worker_count: 2\n")?;
    /// assert_eq!(config.worker_count, 2);
    /// let err = Config::from_yaml_str("event_broker:\n  mode: asnyc\n").unwrap_err();
    /// assert_eq!(err.to_string(), r#"invalid configuration: event_broker.mode: expected sync or async, got "asnyc""#);
    /// # Ok::<(), eventbroker::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError`] naming the key and what is wrong with it: invalid YAML (the key is then
    /// the line and column), a missing `event_broker` mapping, an unknown key, a bad value.
    #[cfg(feature = "yaml")]
    pub fn from_yaml_str(yaml: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_str_with(yaml, &Env::process())
    }

    /// As [`Config::from_yaml_str`], reading variables from `env`.
    ///
    /// ```
    /// use eventbroker::config::{Config, Env};
    ///
    /// let env = Env::from_vars([("HOSTNAME", "api-7"), ("EVENTBROKER_MODE", "sync")]);
    /// let config = Config::from_yaml_str_with(
    ///     "event_broker:\n  instance_id: \"${HOSTNAME}\"\n  mode: async\n",
    ///     &env,
    /// )?;
    /// assert_eq!(config.instance_id, "api-7");
    /// assert_eq!(config.mode, eventbroker::Mode::Sync); // the override wins
    /// # Ok::<(), eventbroker::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// As [`Config::from_yaml_str`].
    #[cfg(feature = "yaml")]
    pub fn from_yaml_str_with(yaml: &str, env: &Env) -> Result<Self, ConfigError> {
        let Some(section) = yaml::event_broker_section(yaml)? else {
            return Err(ConfigError::new(
                "event_broker",
                "missing: the configuration is read from this mapping",
            ));
        };
        Self::read(section, env)
    }

    /// Reads a YAML file as [`Config::from_yaml_str`] does.
    ///
    /// ```no_run
    /// let broker = eventbroker::config::Config::from_yaml_file("/etc/myapp/config.yaml")?.build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Config::from_yaml_str`], naming the file ([`ConfigError::file`]); when the file cannot
    /// be read, a [`ConfigError`] whose key is the path.
    #[cfg(feature = "yaml")]
    pub fn from_yaml_file(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        Self::from_yaml_file_with(path, &Env::process())
    }

    /// As [`Config::from_yaml_file`], reading variables from `env`.
    ///
    /// ```
    /// use eventbroker::config::{Config, Env};
    ///
    /// let path = std::env::temp_dir().join(format!("eventbroker-doc-{}.yaml", std::process::id()));
    /// std::fs::write(&path, "event_broker:\n  worker_count: ${WORKERS}\n")?;
    /// let config = Config::from_yaml_file_with(&path, &Env::from_vars([("WORKERS", "3")]))?;
    /// assert_eq!(config.worker_count, 3);
    ///
    /// let err = Config::from_yaml_file_with(&path, &Env::from_vars([("WORKERS", "0")])).unwrap_err();
    /// assert_eq!(err.file(), Some(path.display().to_string().as_str()));
    /// std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Config::from_yaml_file`].
    #[cfg(feature = "yaml")]
    pub fn from_yaml_file_with(path: impl AsRef<std::path::Path>, env: &Env) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::new(path.display().to_string(), format!("cannot read the file: {error}"))
        })?;
        Self::from_yaml_str_with(&text, env).map_err(|error| error.in_file(path))
    }

    /// The defaults with the `EVENTBROKER_*` overrides of the process environment.
    ///
    /// ```
    /// // With no EVENTBROKER_ variable set, the defaults.
    /// # if std::env::vars().all(|(k, _)| !k.starts_with("EVENTBROKER_")) {
    /// let config = eventbroker::config::Config::from_env()?;
    /// assert_eq!(config, eventbroker::config::Config::default());
    /// # }
    /// # Ok::<(), eventbroker::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable and key of a bad value, or an `EVENTBROKER_` variable
    /// under a section's prefix that names no key.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_with(&Env::process())
    }

    /// As [`Config::from_env`], reading variables from `env`.
    ///
    /// ```
    /// use eventbroker::config::{Config, Env};
    ///
    /// let env = Env::from_vars([("EVENTBROKER_RETRY_POLICY_MAX_RETRIES", "0")]);
    /// assert_eq!(Config::from_env_with(&env)?.retry_policy.max_retries, 0);
    /// let typo = Env::from_vars([("EVENTBROKER_RETRY_POLICY_MAX_RETRY", "0")]);
    /// assert_eq!(Config::from_env_with(&typo).unwrap_err().key(), "EVENTBROKER_RETRY_POLICY_MAX_RETRY");
    /// # Ok::<(), eventbroker::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// As [`Config::from_env`].
    pub fn from_env_with(env: &Env) -> Result<Self, ConfigError> {
        Self::read(Node::Null, env)
    }

    fn read(node: Node, env: &Env) -> Result<Self, ConfigError> {
        let reader = Reader::new(env);
        // A value out of range is found after it was read: its error names the variable it came
        // from here, as an error found while reading it does.
        Self::read_with(&reader, node).map_err(|error| reader.with_source(error))
    }

    fn read_with(reader: &Reader<'_>, node: Node) -> Result<Self, ConfigError> {
        let mut root = reader.root(node)?;
        let config = Self::read_root(&mut root)?;
        root.finish()?;
        reader.finish()?;
        config.builder_settings().validate().map_err(|e| e.within("event_broker"))?;
        Ok(config)
    }

    fn read_root(s: &mut Section<'_, '_>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        set(&mut c.enabled, s.bool("enabled")?);
        // `postgres` and `postgresql` as well as the seed's `database`: the cargo feature's name.
        if let Some(kind) =
            s.choice("provider", &["memory", "redis", "nats", "database", "postgres", "postgresql"])?
        {
            c.provider = match kind {
                "redis" => ProviderKind::Redis,
                "nats" => ProviderKind::Nats,
                "database" | "postgres" | "postgresql" => ProviderKind::Database,
                _ => ProviderKind::Memory,
            };
        }
        if let Some(mode) = s.choice("mode", &["sync", "async"])? {
            c.mode = if mode == "sync" { Mode::Sync } else { Mode::Async };
        }
        set(&mut c.worker_count, s.uint("worker_count")?);
        set(&mut c.buffer_size, s.uint("buffer_size")?);
        set(&mut c.instance_id, s.string("instance_id")?);
        c.retry_policy = read_section(s, "retry_policy", |s| read_retry_policy(s, c.retry_policy))?;
        c.backpressure = read_section(s, "backpressure", |s| read_backpressure(s, c.backpressure))?;
        c.wait_strategy = read_section(s, "wait_strategy", |s| read_wait_strategy(s, c.wait_strategy))?;
        set(&mut c.track_status, s.bool("track_status")?);
        c.writer = read_section(s, "writer", |s| {
            let mut writer = c.writer;
            set(&mut writer.max_batch, s.uint("max_batch")?);
            set(&mut writer.max_delay, s.duration("max_delay")?);
            set(&mut writer.max_backlog, s.uint("max_backlog")?);
            Ok(writer)
        })?;
        set(&mut c.claim_idle, s.duration("claim_idle")?);
        if let Some(prefetch) = s.uint("prefetch")? {
            c.prefetch = Some(prefetch);
        }
        set(&mut c.ack_timeout, s.duration("ack_timeout")?);
        set(&mut c.match_cache_capacity, s.uint("match_cache_capacity")?);
        set(&mut c.drop_shutdown_timeout, s.duration("drop_shutdown_timeout")?);
        c.memory = read_section(s, "memory", |s| {
            let mut memory = c.memory.clone();
            set(&mut memory.max_events, s.uint("max_events")?);
            set(&mut memory.max_age, s.duration_or_none("max_age")?);
            set(&mut memory.cleanup_interval, s.duration_or_none("cleanup_interval")?);
            set(&mut memory.stream_capacity, s.uint("stream_capacity")?);
            set(&mut memory.max_dead_letters, s.uint("max_dead_letters")?);
            // A zero interval would have the cleanup thread spin without pause.
            if memory.cleanup_interval == Some(Duration::ZERO) {
                return Err(s.invalid("cleanup_interval", "must be above zero (none: no cleanup thread)"));
            }
            if memory.stream_capacity == 0 {
                return Err(s.invalid("stream_capacity", "must be at least 1"));
            }
            Ok(memory)
        })?;
        c.redis = read_section(s, "redis", RedisSection::read)?;
        c.nats = read_section(s, "nats", NatsSection::read)?;
        c.database = read_section(s, "database", DatabaseSection::read)?;
        let consumer_group = c.redis.consumer_group.clone();
        c.distribution =
            read_section(s, "distribution", |s| read_distribution(s, consumer_group.as_deref()))?;
        c.metrics = read_section(s, "metrics", |s| {
            let mut metrics = c.metrics.clone();
            set(&mut metrics.enabled, s.bool("enabled")?);
            set(&mut metrics.namespace, s.string("namespace")?.map(Some));
            set(&mut metrics.max_types, s.uint("max_types")?);
            set(&mut metrics.timing_sample, s.uint("timing_sample")?);
            set(&mut metrics.report_interval, s.duration("report_interval")?);
            set(&mut metrics.labels, s.string_map("labels")?);
            Ok(metrics)
        })?;
        c.metrics.validate().map_err(|e| e.within("event_broker"))?;
        Ok(c)
    }

    /// The broker's settings, checked as the builder checks them, without a provider.
    fn builder_settings(&self) -> BrokerBuilder {
        let mut builder = Broker::builder()
            .mode(self.mode)
            .workers(self.worker_count)
            .buffer_size(self.buffer_size)
            .retry_policy(self.retry_policy)
            .backpressure(self.backpressure)
            .wait_strategy(self.wait_strategy)
            .track_status(self.track_status)
            .writer(self.writer)
            .claim_idle(self.claim_idle)
            .ack_timeout(self.ack_timeout)
            .match_cache_capacity(self.match_cache_capacity)
            .drop_shutdown_timeout(self.drop_shutdown_timeout);
        if !self.instance_id.is_empty() {
            builder = builder.instance_id(self.instance_id.clone());
        }
        if let Some(prefetch) = self.prefetch {
            builder = builder.prefetch(prefetch);
        }
        if let Some(distribution) = &self.distribution {
            builder = builder.distribution(distribution.clone());
        }
        builder
    }

    /// A builder with every setting of this configuration and its provider, made by the factory;
    /// add what only code can give, then [`build`](BrokerBuilder::build). The memory provider it
    /// makes is the broker's alone (the distribution stays [`Distribution::Local`] unless
    /// configured); a provider given afterwards with [`BrokerBuilder::provider`] replaces it and
    /// is shared as any provider given that way is.
    ///
    /// ```
    /// use eventbroker::config::Config;
    ///
    /// let broker = Config::default().builder()?.instance_id("worker-3").build()?;
    /// assert_eq!(broker.instance_id(), "worker-3");
    /// # Ok::<(), eventbroker::BuildError>(())
    /// ```
    ///
    /// # Errors
    /// [`BuildError::Disabled`] when `enabled` is `false`; [`BuildError::MissingFeature`] when the
    /// provider's (or metrics') cargo feature is not compiled; [`BuildError::Provider`] when the
    /// provider cannot be made (it cannot connect, say); [`BuildError::Config`] for settings out
    /// of range.
    pub fn builder(&self) -> Result<BrokerBuilder, BuildError> {
        if !self.enabled {
            return Err(BuildError::Disabled);
        }
        let mut builder = self.builder_settings();
        builder = factory::with_metrics(builder, &self.metrics)?;
        let provider = factory::provider(self)?;
        // A memory provider made here is this broker's alone: its default distribution stays
        // local, unless the caller gives the builder a provider to share after all.
        builder = match self.provider {
            ProviderKind::Memory => builder.provider_of_its_own(provider),
            _ => builder.provider(provider),
        };
        Ok(builder)
    }

    /// Builds the provider and the broker.
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::config::Config;
    ///
    /// let mut config = Config::default();
    /// config.worker_count = 1;
    /// let broker = config.build()?;
    /// assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    /// # Ok::<(), eventbroker::BuildError>(())
    /// ```
    ///
    /// # Errors
    /// As [`Config::builder`], and as [`BrokerBuilder::build`].
    pub fn build(&self) -> Result<Broker, BuildError> {
        self.builder()?.build()
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

fn read_section<T>(
    s: &mut Section<'_, '_>,
    key: &'static str,
    read: impl FnOnce(&mut Section<'_, '_>) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let mut section = s.section(key)?;
    let value = read(&mut section)?;
    section.finish()?;
    Ok(value)
}

fn read_retry_policy(s: &mut Section<'_, '_>, mut policy: RetryPolicy) -> Result<RetryPolicy, ConfigError> {
    set(&mut policy.max_retries, s.uint("max_retries")?);
    let initial_delay = s.duration("initial_delay")?;
    set(&mut policy.max_delay, s.duration("max_delay")?);
    set(&mut policy.backoff_factor, s.float("backoff_factor")?);
    set(&mut policy.jitter, s.float("jitter")?);
    match initial_delay {
        Some(initial_delay) => policy.initial_delay = initial_delay,
        // Lowering `max_delay` below the default first delay lowers that too.
        None => policy.initial_delay = policy.initial_delay.min(policy.max_delay),
    }
    Ok(policy)
}

fn read_backpressure(s: &mut Section<'_, '_>, default: Backpressure) -> Result<Backpressure, ConfigError> {
    let policy = s.choice("policy", &["block", "reject"])?;
    let timeout = s.duration("timeout")?;
    let default_timeout = match default {
        Backpressure::Block(timeout) => timeout,
        Backpressure::Reject => Duration::from_secs(1),
    };
    match (policy, timeout) {
        (Some("reject"), Some(_)) => Err(s.invalid("timeout", "only applies to policy block")),
        (Some("reject"), None) => Ok(Backpressure::Reject),
        (None, None) => Ok(default),
        (_, timeout) => Ok(Backpressure::Block(timeout.unwrap_or(default_timeout))),
    }
}

fn read_wait_strategy(s: &mut Section<'_, '_>, default: WaitStrategy) -> Result<WaitStrategy, ConfigError> {
    let kind = s.choice("kind", &["blocking", "yielding", "busy_spin"])?;
    let spins = s.uint("spins")?;
    let yields = s.uint("yields")?;
    let tuned = spins.is_some() || yields.is_some();
    let (default_spins, default_yields) = match default {
        WaitStrategy::Blocking { spins, yields } => (spins, yields),
        WaitStrategy::BusySpin | WaitStrategy::Yielding => {
            (WaitStrategy::DEFAULT_SPINS, WaitStrategy::DEFAULT_YIELDS)
        }
    };
    let blocking = WaitStrategy::Blocking {
        spins: spins.unwrap_or(default_spins),
        yields: yields.unwrap_or(default_yields),
    };
    match kind {
        Some("busy_spin" | "yielding") if tuned => {
            Err(s.invalid("spins", "spins and yields only apply to kind blocking"))
        }
        Some("busy_spin") => Ok(WaitStrategy::BusySpin),
        Some("yielding") => Ok(WaitStrategy::Yielding),
        Some(_) => Ok(blocking),
        None if tuned => Ok(blocking),
        None => Ok(default),
    }
}

fn read_distribution(
    s: &mut Section<'_, '_>,
    consumer_group: Option<&str>,
) -> Result<Option<Distribution>, ConfigError> {
    let mode = s.choice("mode", &["local", "fan_out", "work_queue"])?;
    let group = s.string("group")?;
    match (mode, group) {
        (Some("work_queue"), group) => match group.or_else(|| consumer_group.map(str::to_owned)) {
            Some(group) => Ok(Some(Distribution::WorkQueue(group))),
            None => Err(s.invalid("group", "work_queue needs a group name (or redis.consumer_group)")),
        },
        (_, Some(_)) => Err(s.invalid("group", "only applies to mode work_queue")),
        (Some("local"), None) => Ok(Some(Distribution::Local)),
        (Some(_), None) => Ok(Some(Distribution::FanOut)),
        (None, None) => Ok(None),
    }
}
