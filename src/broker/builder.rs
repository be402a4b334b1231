//! [`BrokerBuilder`]: a broker's settings, checked, and the threads started.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::claim::InstanceClaim;
use super::engine::Engine;
use super::stats::SyncCounters;
use super::{Broker, Handle};
use crate::dispatch::backpressure::Backpressure;
use crate::dispatch::inbound::InboundPump;
use crate::dispatch::intake::Intake;
use crate::dispatch::retry::RetryPolicy;
use crate::dispatch::shard::ShardSet;
use crate::dispatch::wait::WaitStrategy;
use crate::dispatch::worker::{InlineSink, WorkerConfig, WorkerShared};
use crate::dispatch::writer::{ProviderWriter, WriterConfig};
use crate::error::{BuildError, ConfigError};
use crate::metrics::{EngineMetrics, MetricsConfig};
use crate::provider::{ConsumerGroup, InboundConfig, MemoryProvider, Provider};
use crate::subscription::SubscriptionTable;

/// How [`Broker::publish`] delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// On the caller's thread, before `publish` returns.
    Sync,
    /// Queued to a shard's worker thread.
    #[default]
    Async,
}

/// How a broker shares events with the other brokers of its provider: other instances of the
/// service, across a Redis, NATS or PostgreSQL server, or other brokers in this process sharing one
/// [`MemoryProvider`].
///
/// Either way, an instance's own events reach its own subscribers once, through its shards, and
/// never again from the provider (no echo); delivery across instances is at least once; events of
/// one partition key from one publisher are handled in publish order on every instance.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::{Broker, Distribution, MemoryProvider};
///
/// let bus = Arc::new(MemoryProvider::default());
/// let api = Broker::builder().provider(bus.clone()).instance_id("api-1").build()?;
/// let mailer = Broker::builder()
///     .provider(bus)
///     .instance_id("mailer-1")
///     .distribution(Distribution::WorkQueue("mailers".into()))
///     .build()?;
/// assert_eq!(api.stats().distribution, Distribution::FanOut);
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Distribution {
    /// This broker neither receives other brokers' events nor tags its own for them; its events
    /// are written to the provider only when status tracking is on. The default of a broker with
    /// its own memory provider, which nobody else shares.
    ///
    /// It is also how an instance that only publishes joins instances that receive: with status
    /// tracking on, its events are written, and the others receive them, while it creates no
    /// consumer group of its own (in fan-out every instance id makes a durable one on the server,
    /// kept after the instance is gone until [`Provider::delete_group`](crate::Provider::delete_group)).
    Local,
    /// Every instance receives every event the others publish, once, under a durable group named
    /// by its instance id: an instance restarted under the same id resumes where it left off. The
    /// default with a provider set through [`BrokerBuilder::provider`].
    FanOut,
    /// Instances naming the same group share the events the others publish, each event to one of
    /// them. Members should subscribe alike: an event no subscription of the member that took it
    /// matches counts as handled, except one that a subscription ended in the last 2 s (an
    /// `unsubscribe`, or a stream's or acknowledged subscription's receiver dropped) matched: it
    /// was fetched for that subscription, and goes back to the group for a member that still
    /// wants it ([`BrokerStats::returned`](crate::BrokerStats::returned)). Events published by a
    /// member are handled by that member, never by the rest of its group. Each member holds at most its
    /// [prefetch](BrokerBuilder::prefetch) of the group's events at a time, so a burst is shared.
    /// A name that is empty, holds a control character, or has leading or trailing whitespace
    /// fails the build with [`BuildError::Config`](crate::BuildError::Config) on `distribution`.
    WorkQueue(String),
}

impl Distribution {
    /// The consumer group this broker receives in, when it receives at all.
    fn group(&self, instance_id: &str) -> Option<ConsumerGroup> {
        match self {
            Self::Local => None,
            Self::FanOut => Some(ConsumerGroup::Instance(instance_id.to_owned())),
            Self::WorkQueue(name) => Some(ConsumerGroup::Shared(name.clone())),
        }
    }
}

/// Most worker threads a broker may have.
pub const MAX_WORKERS: usize = 1024;
/// Largest ring, in events per shard.
pub const MAX_BUFFER_SIZE: usize = 1 << 24;
/// Most event types a worker's match cache may hold: the cache is allocated whole when the
/// worker starts, some 64 bytes a type.
pub const MAX_MATCH_CACHE_CAPACITY: usize = 1 << 20;

/// Configures and starts a [`Broker`].
///
/// ```
/// use std::time::Duration;
/// use eventbroker::{Backpressure, Broker, Mode, RetryPolicy, WaitStrategy};
///
/// let broker = Broker::builder()
///     .mode(Mode::Async)
///     .workers(2)
///     .buffer_size(1024)
///     .instance_id("api-1")
///     .retry_policy(RetryPolicy { max_retries: 2, ..RetryPolicy::default() })
///     .backpressure(Backpressure::Reject)
///     .wait_strategy(WaitStrategy::default())
///     .build()?;
/// assert_eq!(broker.instance_id(), "api-1");
/// assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[must_use]
pub struct BrokerBuilder {
    pub(crate) mode: Mode,
    pub(crate) workers: usize,
    pub(crate) buffer_size: usize,
    pub(crate) instance_id: Option<String>,
    pub(crate) retry: RetryPolicy,
    pub(crate) backpressure: Backpressure,
    pub(crate) wait: WaitStrategy,
    pub(crate) provider: Option<Arc<dyn Provider>>,
    /// Whether `provider` is one the builder made for this broker alone (from a configuration's
    /// memory section), which nobody else shares: the default distribution stays local.
    pub(crate) provider_of_its_own: bool,
    pub(crate) distribution: Option<Distribution>,
    pub(crate) claim_idle: Duration,
    pub(crate) prefetch: Option<usize>,
    pub(crate) ack_timeout: Duration,
    pub(crate) track_status: bool,
    pub(crate) writer: WriterConfig,
    pub(crate) cache_capacity: usize,
    pub(crate) max_batch: usize,
    pub(crate) drop_timeout: Duration,
    pub(crate) metrics: MetricsConfig,
}

impl Default for BrokerBuilder {
    /// The defaults: async, one worker per CPU, 1024 events per shard, the memory provider, the
    /// seed's retry policy, block up to 1 s when full.
    fn default() -> Self {
        Self {
            mode: Mode::Async,
            workers: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            buffer_size: 1024,
            instance_id: None,
            retry: RetryPolicy::default(),
            backpressure: Backpressure::default(),
            wait: WaitStrategy::default(),
            provider: None,
            provider_of_its_own: false,
            distribution: None,
            claim_idle: InboundConfig::DEFAULT_CLAIM_IDLE,
            prefetch: None,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            track_status: true,
            writer: WriterConfig::default(),
            cache_capacity: 4096,
            max_batch: 256,
            drop_timeout: Duration::from_secs(30),
            metrics: MetricsConfig::default(),
        }
    }
}

/// Numbers brokers apart, for the thread-local that tells a worker of this broker.
static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

impl BrokerBuilder {
    /// [`Mode::Sync`] or [`Mode::Async`] (default).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Number of shards, each with one worker thread. Default: the number of CPUs.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Events each shard's ring holds, rounded up to a power of two: 2 to [`MAX_BUFFER_SIZE`] (16
    /// Mi). Default 1024. A worker takes a batch of events out of its ring before it handles
    /// them (up to 256, at most the ring's size), so a shard accepts up to one more batch than
    /// the ring holds, and frees slots a batch at a time.
    pub fn buffer_size(mut self, events: usize) -> Self {
        self.buffer_size = events;
        self
    }

    /// This instance's id, written into events published without one, and (fan-out) the name of
    /// its durable group. Default: the host name.
    ///
    /// It must be unique among the instances sharing a provider, and stable across restarts: an
    /// instance restarted under its id resumes its group where it left off. Two brokers under one
    /// id share one group and take each other's events for their own echoes, so neither receives
    /// the other's: two processes on one host left on the default do that. Within one process,
    /// building a broker that would receive under the id of another live broker of this process
    /// in the same [group namespace](crate::Provider::group_namespace) fails with
    /// [`BuildError::Config`] on `instance_id`, naming the namespace: the same server (its
    /// address as written, never resolved) and the same Redis stream, NATS stream or PostgreSQL
    /// table, through one provider object or two (two brokers built from one
    /// [`Config`](crate::config::Config) have one each), in fan-out or in a work queue (where two
    /// members of one id are one consumer). Across processes nothing can tell, so give each
    /// process its own (a pod's name, or the host name and the service's role). An id with a
    /// control character, or with leading or trailing whitespace, fails the build with
    /// [`BuildError::Config`] on `instance_id`.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Retry policy of every delivery. Default: [`RetryPolicy::default`].
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// What publishing does when a shard is full. Default: block up to 1 s.
    pub fn backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = backpressure;
        self
    }

    /// How idle workers wait. Default: spin, then yield, then park.
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }

    /// Where events, statuses and dead letters are stored, and through which this broker meets the
    /// other instances. Default: a [`MemoryProvider`] of its own. Give several brokers the same
    /// provider (or providers on the same server) to connect them; see [`Distribution`].
    ///
    /// Setting a provider makes [`Distribution::FanOut`] the default, memory provider included:
    /// every event this broker stores is then also logged for the other instances, and it reads
    /// theirs. A broker that is given a memory provider only for its settings (its bounds, say) and
    /// shares it with nobody should say so with [`Distribution::Local`], which skips that work: on
    /// the workload bench, one publisher and one worker, a lone broker left at fan-out ran at about
    /// 0.7 of the same broker local.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use eventbroker::{Broker, Distribution, MemoryConfig, MemoryProvider};
    ///
    /// let provider = Arc::new(MemoryProvider::new(MemoryConfig { max_events: 100_000, ..MemoryConfig::default() }));
    /// let broker = Broker::builder().provider(provider).distribution(Distribution::Local).build()?;
    /// # Ok::<(), eventbroker::BuildError>(())
    /// ```
    pub fn provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.provider = Some(provider);
        self.provider_of_its_own = false;
        self
    }

    /// A provider made for this broker alone, as [`Config::builder`](crate::config::Config::builder)
    /// makes a memory provider with the configuration's bounds: unlike one given with
    /// [`provider`](Self::provider), it leaves the default distribution local.
    pub(crate) fn provider_of_its_own(mut self, provider: Arc<dyn Provider>) -> Self {
        self.provider = Some(provider);
        self.provider_of_its_own = true;
        self
    }

    /// How this broker shares events with the other brokers of its provider. Default:
    /// [`Distribution::FanOut`] when a provider is set, [`Distribution::Local`] otherwise.
    pub fn distribution(mut self, distribution: Distribution) -> Self {
        self.distribution = Some(distribution);
        self
    }

    /// How long an event fetched from another instance may stay unacknowledged before the group
    /// redelivers it (to another member, or to this instance's next incarnation). Deliveries waiting
    /// for a retry or an acknowledgement are extended meanwhile, every third of it, and in a
    /// [work queue](Distribution::WorkQueue) so is every event the broker holds, waiting in a
    /// shard or being handled: another member takes an event only from a member that stopped
    /// extending it (one that died, or shut down past its deadline). Default 30 s.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Most events from other instances this broker holds at once: fetched, and not yet
    /// acknowledged or given back (waiting in its shards, being handled, waiting for a retry, or
    /// waiting for the consumer of an [acknowledged delivery](Broker::subscribe_acked) to settle it).
    /// It fetches more only as they end.
    ///
    /// Default: in a [work queue](Distribution::WorkQueue), 32 per worker, so that members share a
    /// burst between them rather than the first to fetch taking it all into its shards; in
    /// fan-out, as many as the shards hold. Raise it for handlers that take microseconds, where
    /// each fetch's round trip to the server then carries more events; lower it for handlers that
    /// take seconds. At least 1.
    pub fn prefetch(mut self, events: usize) -> Self {
        self.prefetch = Some(events);
        self
    }

    /// How long an [acknowledged delivery](Broker::subscribe_acked) may wait for its consumer's
    /// [`ack`](crate::Delivery::ack) or [`fail`](crate::Delivery::fail) before it counts as failed
    /// (and is retried, then dead-lettered, as a handler's failure is; a late settle is ignored).
    /// Default 30 s; at least 1 ms. An event from another instance stays claimed by this one while
    /// it waits: the broker extends its claim, as for a retry. The time runs from when the
    /// delivery is made, in the channel or not: a delivery that timed out unread is still handed
    /// to the consumer, whose settle is then ignored (its retry is a delivery of its own), so set
    /// it well above what the consumer takes behind a full channel.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Whether every event's status changes are written to the provider (default `true`). With
    /// `false` the provider gets only dead letters, confirmed publishes and, when the broker
    /// shares events with other instances, the events themselves: the lowest-overhead setting.
    pub fn track_status(mut self, track: bool) -> Self {
        self.track_status = track;
        self
    }

    /// How the provider writer batches. Default: [`WriterConfig::default`].
    pub fn writer(mut self, config: WriterConfig) -> Self {
        self.writer = config;
        self
    }

    /// Distinct event types each worker's match cache holds, from 1 to
    /// [`MAX_MATCH_CACHE_CAPACITY`]. Default 4096.
    pub fn match_cache_capacity(mut self, types: usize) -> Self {
        self.cache_capacity = types;
        self
    }

    /// How long dropping the last handle waits for the shutdown it runs. Default 30 s.
    pub fn drop_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.drop_timeout = timeout;
        self
    }

    /// How the broker records metrics through the `metrics` facade (feature `metrics`); see
    /// [`crate::metrics`]. Default [`MetricsConfig::default`]: recorded into whatever recorder the
    /// application installs, at no cost while it installs none.
    ///
    /// ```
    /// use eventbroker::Broker;
    /// use eventbroker::metrics::MetricsConfig;
    ///
    /// let broker = Broker::builder()
    ///     .metrics(MetricsConfig { namespace: Some("orders".into()), ..MetricsConfig::default() })
    ///     .build()?;
    /// # Ok::<(), eventbroker::BuildError>(())
    /// ```
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, config: MetricsConfig) -> Self {
        self.metrics = config;
        self
    }

    /// Checks the settings, opens the inbound source when the broker receives from other
    /// instances, and starts the worker, writer and inbound threads.
    ///
    /// # Errors
    /// [`BuildError::Config`] naming the bad setting; [`BuildError::Provider`] when the inbound
    /// source cannot be opened; [`BuildError::Spawn`] when a thread cannot be started.
    pub fn build(self) -> Result<Broker, BuildError> {
        self.validate()?;
        let instance_id = self.instance_id.filter(|id| !id.is_empty()).unwrap_or_else(default_instance_id);
        let distribution =
            self.distribution.unwrap_or(if self.provider.is_some() && !self.provider_of_its_own {
                Distribution::FanOut
            } else {
                Distribution::Local
            });
        let provider = self.provider.unwrap_or_else(|| Arc::new(MemoryProvider::default()));
        let group = distribution.group(&instance_id);
        let claim = group.as_ref().map(|g| InstanceClaim::take(&*provider, &instance_id, g)).transpose()?;
        let source = match &group {
            None => None,
            Some(group) => {
                check_capabilities(&*provider, group)?;
                let config =
                    InboundConfig::new(instance_id.clone(), group.clone()).with_claim_idle(self.claim_idle);
                Some(provider.open_inbound(&config).map_err(BuildError::Provider)?)
            }
        };
        let held_inbound = (source.is_some() && matches!(distribution, Distribution::WorkQueue(_)))
            .then(crate::dispatch::writer::HeldInbound::default);
        let writer = ProviderWriter::spawn(
            Arc::clone(&provider),
            source.clone(),
            group.as_ref().map(ConsumerGroup::key),
            self.writer,
            held_inbound.clone(),
        )
        .map_err(|source| BuildError::Spawn { thread: "eventbroker-writer".into(), source })?;
        let id = NEXT_ENGINE.fetch_add(1, Ordering::Relaxed);
        let store_events = self.track_status || group.is_some();
        let inline = store_events && provider.capabilities().inline_writes;
        let metrics = EngineMetrics::new(&self.metrics, &instance_id);
        let shared = Arc::new(WorkerShared {
            table: Arc::new(SubscriptionTable::new()),
            writer: Arc::new(writer),
            shutdown: crate::dispatch::worker::ShutdownSignal::default(),
            abandoned: std::sync::atomic::AtomicBool::new(false),
            inbound_ended: crossbeam_utils::CachePadded::default(),
            held_inbound,
            engine: id,
            inline: inline.then(|| InlineSink::new(&provider)),
            metrics: metrics.clone(),
            failing: crate::dispatch::worker::Failing::default(),
        });
        let config = WorkerConfig {
            retry: self.retry,
            track_status: self.track_status,
            wait: self.wait,
            cache_capacity: self.cache_capacity,
            max_batch: self.max_batch,
            extend_every: source.as_ref().map(|_| self.claim_idle / 3),
            ack_timeout: self.ack_timeout,
            give_back_unwanted: matches!(distribution, Distribution::WorkQueue(_)),
        };
        let capacity = self.buffer_size.next_power_of_two();
        let shards = ShardSet::spawn(self.workers, capacity, &instance_id, &shared, config)?;
        let prefetch = self.prefetch.unwrap_or(match distribution {
            Distribution::WorkQueue(_) => WORK_QUEUE_PREFETCH_PER_WORKER.saturating_mul(self.workers),
            Distribution::Local | Distribution::FanOut => usize::MAX,
        });
        let inbound = source.map(|source| Arc::new(InboundPump::new(source, prefetch, self.claim_idle / 3)));
        let engine = Arc::new(Engine {
            id,
            store_events,
            inline,
            origin: group.as_ref().map(ConsumerGroup::key),
            instance_id: instance_id.into(),
            mode: self.mode,
            distribution,
            retry: self.retry,
            backpressure: self.backpressure,
            track_status: self.track_status,
            buffer_size: capacity,
            provider,
            shared,
            shards,
            inbound: inbound.clone(),
            intake: Intake::new(),
            sync: SyncCounters::default(),
            sync_calls: super::drain::SyncCalls::default(),
            rejected: AtomicU64::new(0),
            published_reported: AtomicU64::new(0),
            claim: parking_lot::Mutex::new(claim),
            shutdown: super::shutdown::Stopping::new(),
            drop_timeout: self.drop_timeout,
            ack_timeout: self.ack_timeout,
            metrics,
        });
        let broker = Broker { handle: Arc::new(Handle { engine: Arc::clone(&engine) }) };
        #[cfg(feature = "metrics")]
        engine.start_metrics_reporter()?;
        if let Some(pump) = inbound {
            pump.sync_filter(&engine.shared.table);
            let name = format!("eb-in-{}", engine.instance_id);
            // On failure, dropping `broker` shuts the rest down again.
            pump.start(Arc::clone(&engine), name.clone())
                .map_err(|source| BuildError::Spawn { thread: name, source })?;
        }
        Ok(broker)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        // The id names the worker threads (a NUL makes spawning panic) and is stored as text (which
        // PostgreSQL refuses with a NUL); a control character in it is a mistake either way.
        if let Some(id) = self.instance_id.as_deref().filter(|id| id.contains(char::is_control)) {
            return Err(ConfigError::new("instance_id", format!("{id:?} contains a control character")));
        }
        // " api-1" would name another consumer group than "api-1", unseen in most logs.
        if let Some(id) = self.instance_id.as_deref().filter(|id| id.trim() != *id) {
            return Err(ConfigError::new(
                "instance_id",
                format!("{id:?} has leading or trailing whitespace"),
            ));
        }
        within("worker_count", self.workers, 1, MAX_WORKERS)?;
        within("buffer_size", self.buffer_size, 2, MAX_BUFFER_SIZE)?;
        self.retry.validate()?;
        if self.writer.max_batch == 0 {
            return Err(ConfigError::new("writer.max_batch", "must be at least 1"));
        }
        if self.writer.max_backlog == 0 {
            return Err(ConfigError::new("writer.max_backlog", "must be at least 1"));
        }
        within("match_cache_capacity", self.cache_capacity, 1, MAX_MATCH_CACHE_CAPACITY)?;
        if self.prefetch == Some(0) {
            return Err(ConfigError::new("prefetch", "must be at least 1"));
        }
        if self.ack_timeout < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "ack_timeout",
                format!("must be at least 1ms, got {:?}", self.ack_timeout),
            ));
        }
        if self.claim_idle < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "claim_idle",
                format!("must be at least 10ms, got {:?}", self.claim_idle),
            ));
        }
        if let Some(Distribution::WorkQueue(group)) = &self.distribution {
            if group.is_empty() {
                return Err(ConfigError::new("distribution", "a work-queue group needs a name"));
            }
            // As an instance id: "mailers " is another group than "mailers", unseen in most
            // logs, and headers that carry it lose trailing whitespace (NATS).
            if group.trim() != group || group.contains(char::is_control) {
                return Err(ConfigError::new(
                    "distribution",
                    format!(
                        "work-queue group {group:?} has a control character or leading or trailing whitespace"
                    ),
                ));
            }
        }
        self.metrics.validate()
    }
}

/// Checks the provider can deliver across instances in `group`'s way.
fn check_capabilities(provider: &dyn Provider, group: &ConsumerGroup) -> Result<(), ConfigError> {
    let caps = provider.capabilities();
    if !caps.inbound {
        return Err(ConfigError::new(
            "distribution",
            format!(
                "the {} provider cannot deliver events across instances; use Distribution::Local",
                provider.name()
            ),
        ));
    }
    if group.is_shared() && !caps.work_queue {
        return Err(ConfigError::new(
            "distribution",
            format!("the {} provider has no work-queue groups; use Distribution::FanOut", provider.name()),
        ));
    }
    Ok(())
}

/// Default [`BrokerBuilder::ack_timeout`].
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`BrokerBuilder::prefetch`] of a work-queue member, per worker.
const WORK_QUEUE_PREFETCH_PER_WORKER: usize = 32;

fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("eventbroker-{}", std::process::id()))
}

/// `Ok` when `value`, the setting `key`, is from `min` to `max`; else the error that says so.
fn within(key: &'static str, value: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(key, format!("must be between {min} and {max}, got {value}")))
    }
}
