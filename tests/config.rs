//! Configuration from YAML: every example of the seed's README loads, each kind of bad value gets
//! an error naming its key, `${VAR}` expansion, defaults and `EVENTBROKER_*` overrides.
//!
//! Variables come from `Env::from_vars` maps, never from the process environment, so these tests
//! run in parallel without touching each other (the one test of the process environment only
//! reads `PATH`).

use std::sync::Arc;
use std::time::Duration;

use eventbroker::config::{Config, Env, NatsStorageKind, ProviderKind};
use eventbroker::{
    Backpressure, Broker, BuildError, ConfigError, Distribution, Event, EventSource, MemoryProvider, Mode,
    RetryPolicy, WaitStrategy,
};

fn load(yaml: &str) -> Config {
    Config::from_yaml_str_with(yaml, &Env::from_vars([("HOSTNAME", "host-1")]))
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn load_with(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_yaml_str_with(yaml, &Env::from_vars(vars.iter().copied()))
}

fn error(yaml: &str) -> ConfigError {
    match load_with(yaml, &[]) {
        Ok(config) => panic!("expected an error, got {config:?}\n{yaml}"),
        Err(error) => error,
    }
}

const QUICK_START: &str = r#"
event_broker:
  enabled: true
  provider: memory  # memory, redis, nats, database
  mode: async       # sync, async
  worker_count: 10
  buffer_size: 1000
  instance_id: "${HOSTNAME}"
"#;

#[test]
fn the_seed_quick_start_loads_and_builds() {
    let config = load(QUICK_START);
    assert!(config.enabled);
    assert_eq!(config.provider, ProviderKind::Memory);
    assert_eq!(config.mode, Mode::Async);
    assert_eq!(config.worker_count, 10);
    assert_eq!(config.buffer_size, 1000);
    assert_eq!(config.instance_id, "host-1");
    let broker = config.build().unwrap();
    assert_eq!(broker.instance_id(), "host-1");
    let stats = broker.stats();
    assert_eq!((stats.workers, stats.distribution), (10, Distribution::Local));
    assert_eq!(stats.shards[0].capacity, 1024, "1000 rounds up to a power of two");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A configured broker given a provider to share joins the other brokers on it as any broker
/// given a provider does; only the memory provider the configuration makes is its own.
#[test]
fn a_configured_broker_given_a_shared_provider_joins_its_bus() {
    let bus = Arc::new(MemoryProvider::default());
    let config = load(QUICK_START);
    let receiver = config.builder().unwrap().provider(bus.clone()).instance_id("receiver").build().unwrap();
    assert_eq!(receiver.stats().distribution, Distribution::FanOut);
    let (tx, rx) = std::sync::mpsc::channel();
    receiver
        .subscribe_infallible("users.*", move |event: &Event| {
            let _ = tx.send(event.instance_id.to_string());
        })
        .unwrap();
    let sender = Broker::builder().provider(bus.clone()).instance_id("sender").build().unwrap();
    sender.publish(Event::new(EventSource::Internal, "users.create")).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "sender");
    for broker in [sender, receiver] {
        assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    }
    let own = config.builder().unwrap().instance_id("alone").build().unwrap();
    assert_eq!(own.stats().distribution, Distribution::Local, "its own memory provider");
    assert!(own.shutdown(Duration::from_secs(5)).is_clean());
}

#[test]
fn the_seed_provider_examples_load() {
    let memory = load("event_broker:\n  provider: memory\n");
    assert_eq!(memory.provider, ProviderKind::Memory);
    // The cargo feature's name, read as the seed's `database`.
    for name in ["postgres", "PostgreSQL"] {
        assert_eq!(load(&format!("event_broker:\n  provider: {name}\n")).provider, ProviderKind::Database);
    }

    let redis = load(
        r#"
event_broker:
  provider: redis
  redis:
    stream_name: "resolvespec:events"
    consumer_group: "resolvespec-workers"
    host: "localhost"
    port: 6379
"#,
    );
    assert_eq!(redis.provider, ProviderKind::Redis);
    assert_eq!(redis.redis.stream_name.as_deref(), Some("resolvespec:events"));
    assert_eq!(redis.redis.consumer_group.as_deref(), Some("resolvespec-workers"));
    assert_eq!(redis.redis.url().as_deref(), Some("redis://localhost:6379/0"));
    assert_eq!(redis.distribution, None, "fan-out, the provider's default");

    let nats = load(
        r#"
event_broker:
  provider: nats
  nats:
    url: "nats://localhost:4222"
    stream_name: "RESOLVESPEC_EVENTS"
"#,
    );
    assert_eq!(nats.provider, ProviderKind::Nats);
    assert_eq!(nats.nats.url.as_deref(), Some("nats://localhost:4222"));
    assert_eq!(nats.nats.stream_name.as_deref(), Some("RESOLVESPEC_EVENTS"));

    let database = load(
        r#"
event_broker:
  provider: database
  database:
    table_name: "events"
    channel: "resolvespec_events"
"#,
    );
    assert_eq!(database.provider, ProviderKind::Database);
    assert_eq!(database.database.table_name.as_deref(), Some("events"));
    assert_eq!(database.database.channel.as_deref(), Some("resolvespec_events"));
}

#[test]
fn the_seed_mode_and_retry_examples_load() {
    let r#async = load("event_broker:\n  mode: async\n  worker_count: 10\n  buffer_size: 1000\n");
    assert_eq!((r#async.mode, r#async.worker_count), (Mode::Async, 10));
    let sync = load("event_broker:\n  mode: sync\n");
    assert_eq!(sync.mode, Mode::Sync);

    let retry = load(
        r"
event_broker:
  retry_policy:
    max_retries: 3
    initial_delay: 1s
    max_delay: 30s
    backoff_factor: 2.0  # Exponential backoff
",
    );
    assert_eq!(
        retry.retry_policy,
        RetryPolicy {
            max_retries: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            backoff_factor: 2.0,
            ..RetryPolicy::default()
        }
    );
}

#[test]
fn the_implementation_plan_example_loads_and_keeps_the_applications_other_keys_out() {
    let config = load(
        r#"
server:
  port: 8080
event_broker:
  enabled: true
  provider: redis
  mode: async
  worker_count: 10
  buffer_size: 1000
  instance_id: "${HOSTNAME}"
  redis:
    stream_name: "resolvespec:events"
    consumer_group: "resolvespec-workers"
    host: "localhost"
    port: 6379
"#,
    );
    assert_eq!(config.provider, ProviderKind::Redis);
}

#[test]
fn an_empty_section_is_the_documented_defaults() {
    let config = load("event_broker: {}\n");
    assert_eq!(config, Config::default());
    assert!(config.enabled);
    assert_eq!(config.provider, ProviderKind::Memory);
    assert_eq!(config.mode, Mode::Async);
    assert_eq!(config.buffer_size, 1024);
    assert_eq!(config.retry_policy, RetryPolicy::default());
    assert_eq!(config.backpressure, Backpressure::Block(Duration::from_secs(1)));
    assert_eq!(config.wait_strategy, WaitStrategy::default());
    assert!(config.track_status);
    assert_eq!(config.claim_idle, Duration::from_secs(30));
    assert_eq!(config.ack_timeout, Duration::from_secs(30));
    assert_eq!(config.prefetch, None);
    assert_eq!(config.match_cache_capacity, 4096);
    assert_eq!(config.drop_shutdown_timeout, Duration::from_secs(30));
    assert_eq!(config.metrics.max_types, 256);
    assert_eq!(config.worker_count, std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
}

#[test]
fn every_crate_setting_loads() {
    let config = load(
        r"
event_broker:
  backpressure:
    policy: reject
  wait_strategy:
    kind: blocking
    spins: 5
    yields: 0
  track_status: false
  writer:
    max_batch: 64
    max_delay: 250us
    max_backlog: 1_000
  distribution:
    mode: work_queue
    group: mailers
  claim_idle: 1m30s
  prefetch: 8
  ack_timeout: 2m
  match_cache_capacity: 128
  drop_shutdown_timeout: 5s
  memory:
    max_events: 500
    max_age: none
    cleanup_interval: off
  metrics:
    enabled: false
    namespace: orders
    max_types: 10
    timing_sample: 1
    report_interval: 100ms
    labels:
      broker: orders
      zone: ${HOSTNAME}
  retry_policy:
    jitter: 0
",
    );
    assert_eq!(config.backpressure, Backpressure::Reject);
    assert_eq!(config.wait_strategy, WaitStrategy::Blocking { spins: 5, yields: 0 });
    assert!(!config.track_status);
    assert_eq!(
        (config.writer.max_batch, config.writer.max_delay, config.writer.max_backlog),
        (64, Duration::from_micros(250), 1000)
    );
    assert_eq!(config.distribution, Some(Distribution::WorkQueue("mailers".into())));
    assert_eq!(config.claim_idle, Duration::from_secs(90));
    assert_eq!(config.prefetch, Some(8));
    assert_eq!(config.ack_timeout, Duration::from_secs(120));
    assert_eq!(config.match_cache_capacity, 128);
    assert_eq!(config.drop_shutdown_timeout, Duration::from_secs(5));
    assert_eq!(
        (config.memory.max_events, config.memory.max_age, config.memory.cleanup_interval),
        (500, None, None)
    );
    assert!(!config.metrics.enabled);
    assert_eq!(config.metrics.namespace.as_deref(), Some("orders"));
    assert_eq!((config.metrics.max_types, config.metrics.timing_sample), (10, 1));
    assert_eq!(
        config.metrics.labels,
        [("broker".to_owned(), "orders".to_owned()), ("zone".to_owned(), "host-1".to_owned())]
    );
    assert_eq!(config.retry_policy.jitter.to_bits(), 0.0_f64.to_bits());

    let spin =
        load("event_broker:\n  wait_strategy:\n    kind: busy_spin\n  backpressure:\n    timeout: 250ms\n");
    assert_eq!(spin.wait_strategy, WaitStrategy::BusySpin);
    assert_eq!(spin.backpressure, Backpressure::Block(Duration::from_millis(250)));
}

#[test]
fn the_seed_consumer_group_names_a_work_queue() {
    let config = load(
        "event_broker:\n  provider: redis\n  redis:\n    consumer_group: workers\n  distribution:\n    mode: work_queue\n",
    );
    assert_eq!(config.distribution, Some(Distribution::WorkQueue("workers".into())));
}

#[test]
fn a_bad_mode_names_the_key_and_the_value() {
    let err = error("event_broker:\n  mode: asnyc\n");
    assert_eq!(err.key(), "event_broker.mode");
    assert_eq!(err.reason(), r#"expected sync or async, got "asnyc""#);
    assert_eq!(
        err.to_string(),
        r#"invalid configuration: event_broker.mode: expected sync or async, got "asnyc""#
    );
}

/// A YAML text, the key its error names, and words of the reason.
const BAD_VALUES: &[(&str, &str, &str)] = &[
    (
        "event_broker:\n  provider: kafka\n",
        "event_broker.provider",
        r#"expected memory, redis, nats, database, postgres or postgresql, got "kafka""#,
    ),
    (
        "event_broker:\n  worker_count: ten\n",
        "event_broker.worker_count",
        r#"expected a whole number, got "ten""#,
    ),
    ("event_broker:\n  worker_count: -2\n", "event_broker.worker_count", "expected a whole number, got -2"),
    ("event_broker:\n  worker_count: 0\n", "event_broker.worker_count", "must be between 1 and 1024, got 0"),
    ("event_broker:\n  buffer_size: 1\n", "event_broker.buffer_size", "must be between 2 and"),
    (
        "event_broker:\n  match_cache_capacity: 0\n",
        "event_broker.match_cache_capacity",
        "must be between 1 and 1048576, got 0",
    ),
    (
        "event_broker:\n  match_cache_capacity: 9223372036854775807\n",
        "event_broker.match_cache_capacity",
        "must be between 1 and 1048576, got 9223372036854775807",
    ),
    (
        "event_broker:\n  enabled: yes please\n",
        "event_broker.enabled",
        r#"expected true or false, got "yes please""#,
    ),
    (
        "event_broker:\n  claim_idle: 5\n",
        "event_broker.claim_idle",
        "expected a duration like 250ms, 1s or 1m30s, got 5",
    ),
    ("event_broker:\n  claim_idle: 5 parsecs\n", "event_broker.claim_idle", r#"got "5 parsecs""#),
    ("event_broker:\n  claim_idle: 1ms\n", "event_broker.claim_idle", "must be at least 10ms"),
    ("event_broker:\n  prefetch: 0\n", "event_broker.prefetch", "must be at least 1"),
    ("event_broker:\n  ack_timeout: 0s\n", "event_broker.ack_timeout", "must be at least 1ms"),
    (
        "event_broker:\n  retry_policy:\n    backoff_factor: 0.5\n",
        "event_broker.retry_policy.backoff_factor",
        "at least 1, got 0.5",
    ),
    (
        "event_broker:\n  retry_policy:\n    jitter: 2\n",
        "event_broker.retry_policy.jitter",
        "must lie in [0, 1], got 2",
    ),
    (
        "event_broker:\n  retry_policy:\n    initial_delay: 1m\n    max_delay: 1s\n",
        "event_broker.retry_policy.initial_delay",
        "above max_delay",
    ),
    ("event_broker:\n  retry_policy: 3\n", "event_broker.retry_policy", "expected a mapping of keys, got 3"),
    (
        "event_broker:\n  instance_id: \" api-1\"\n",
        "event_broker.instance_id",
        "leading or trailing whitespace",
    ),
    (
        "event_broker:\n  provider: redis\n  distribution:\n    mode: work_queue\n    group: \"mailers \"\n",
        "event_broker.distribution",
        "leading or trailing whitespace",
    ),
    (
        "event_broker:\n  provider: database\n  database:\n    table_name: tttttttttttttttttttttttttttttttttttttttttttttttttttt\n",
        "event_broker.database.table_name",
        "at most 50 bytes",
    ),
    (
        "event_broker:\n  instance_id: [a, b]\n",
        "event_broker.instance_id",
        "expected a single value, got a list",
    ),
    (
        "event_broker:\n  backpressure:\n    policy: reject\n    timeout: 1s\n",
        "event_broker.backpressure.timeout",
        "only applies to policy block",
    ),
    (
        "event_broker:\n  wait_strategy:\n    kind: busy_spin\n    spins: 3\n",
        "event_broker.wait_strategy.spins",
        "only apply to kind blocking",
    ),
    (
        "event_broker:\n  distribution:\n    mode: work_queue\n",
        "event_broker.distribution.group",
        "needs a group name",
    ),
    (
        "event_broker:\n  distribution:\n    mode: fan_out\n    group: g\n",
        "event_broker.distribution.group",
        "only applies to mode work_queue",
    ),
    ("event_broker:\n  writer:\n    max_batch: 0\n", "event_broker.writer.max_batch", "must be at least 1"),
    // A zero interval would spin the memory provider's cleanup thread on a core of its own.
    (
        "event_broker:\n  memory:\n    cleanup_interval: 0s\n",
        "event_broker.memory.cleanup_interval",
        "must be above zero (none: no cleanup thread)",
    ),
    (
        "event_broker:\n  memory:\n    stream_capacity: 0\n",
        "event_broker.memory.stream_capacity",
        "must be at least 1",
    ),
    (
        "event_broker:\n  metrics:\n    namespace: 9lives\n",
        "event_broker.metrics.namespace",
        "is not a metric name prefix",
    ),
    (
        "event_broker:\n  metrics:\n    labels:\n      9lives: x\n",
        "event_broker.metrics.labels",
        r#""9lives" is not a label name"#,
    ),
    (
        "event_broker:\n  metrics:\n    labels:\n      type: x\n",
        "event_broker.metrics.labels",
        r#""type" is a label the broker or the exporter sets itself"#,
    ),
    (
        "event_broker:\n  metrics:\n    labels:\n      quantile: x\n",
        "event_broker.metrics.labels",
        r#""quantile" is a label the broker or the exporter sets itself"#,
    ),
    (
        "event_broker:\n  metrics:\n    labels:\n      broker: ${UNSET_BROKER_NAME}\n",
        "event_broker.metrics.labels",
        r#""broker" has an empty value"#,
    ),
    (
        "event_broker:\n  metrics:\n    labels:\n      zone: [eu, us]\n",
        "event_broker.metrics.labels.zone",
        "expected a single value, got a list",
    ),
    (
        "event_broker:\n  metrics:\n    timing_sample: 0\n",
        "event_broker.metrics.timing_sample",
        "must be at least 1",
    ),
    ("event_broker:\n  redis:\n    port: 70000\n", "event_broker.redis.port", "70000 is too large"),
    ("event_broker:\n  redis:\n    port: 0\n", "event_broker.redis.port", "must be between 1 and 65535"),
    (
        "event_broker:\n  redis:\n    url: http://cache\n",
        "event_broker.redis.url",
        r#"expected a URL starting with redis:// or rediss://, got "http://cache""#,
    ),
    (
        "event_broker:\n  redis:\n    url: redis://cache\n    host: cache\n",
        "event_broker.redis.host",
        "not both",
    ),
    (
        "event_broker:\n  redis:\n    stream_name: a b\n",
        "event_broker.redis.stream_name",
        "has characters other than",
    ),
    ("event_broker:\n  nats:\n    url: http://x\n", "event_broker.nats.url", "nats://"),
    (
        "event_broker:\n  nats:\n    replicas: 9\n",
        "event_broker.nats.replicas",
        "must be between 1 and 5, got 9",
    ),
    (
        "event_broker:\n  nats:\n    storage: tape\n",
        "event_broker.nats.storage",
        r#"expected file or memory, got "tape""#,
    ),
    ("event_broker:\n  nats:\n    user: u\n", "event_broker.nats.password", "go together"),
    (
        "event_broker:\n  nats:\n    token: t\n    nkey: k\n",
        "event_broker.nats.user",
        "one way to authenticate",
    ),
    (
        "event_broker:\n  nats:\n    subject_prefix: a.*\n",
        "event_broker.nats.subject_prefix",
        "not a subject prefix",
    ),
    (
        "event_broker:\n  database:\n    table_name: 1events\n",
        "event_broker.database.table_name",
        "is not an identifier",
    ),
    ("event_broker:\n  database:\n    url: mysql://db\n", "event_broker.database.url", "postgres://"),
    (
        "event_broker:\n  database:\n    pool_size: 0\n",
        "event_broker.database.pool_size",
        "must be at least 1",
    ),
    ("event_broker:\n  instance_id: \"${HOST\"\n", "event_broker.instance_id", "unterminated ${"),
    ("event_broker:\n  instance_id: \"api\\0one\"\n", "event_broker.instance_id", "control character"),
    ("event_broker:\n  instance_id: \"api-1\\n\"\n", "event_broker.instance_id", "control character"),
];

#[test]
fn each_kind_of_bad_value_gets_its_error() {
    for &(yaml, key, reason) in BAD_VALUES {
        let err = error(yaml);
        assert_eq!(err.key(), key, "{yaml}: {err}");
        assert!(err.reason().contains(reason), "{yaml}: {err}");
    }
}

/// A memory bound as large as there is means "never evict": it builds at once and works, since
/// the provider allocates nothing ahead for its bound.
#[test]
fn the_largest_memory_bound_builds_a_broker_that_works() {
    let config = load("event_broker:\n  memory:\n    max_events: 9223372036854775807\n");
    assert_eq!(config.memory.max_events, usize::try_from(i64::MAX).unwrap());
    let broker = config.build().unwrap();
    for _ in 0..100 {
        broker.publish(eventbroker::Event::new(eventbroker::EventSource::System, "bound.x")).unwrap();
    }
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    assert_eq!(broker.stats().published, 100);
}

/// A string key given a value YAML reads as a number or a boolean takes the value as written:
/// `0123`, `0x1F`, `1e3` and `True` are passwords and ids, not 123, 31, 1000 and `true`.
#[test]
fn strings_that_look_like_numbers_are_taken_as_written() {
    for written in ["0123", "0x1F", "0o17", "1e3", "1.10", "+5", "True", "FALSE", "-0"] {
        let yaml = format!(
            "event_broker:\n  instance_id: {written}\n  redis:\n    password: {written}\n  metrics:\n    labels:\n      zone: {written}\n"
        );
        let config = load(&yaml);
        assert_eq!(config.instance_id, written);
        assert_eq!(config.redis.password.as_deref(), Some(written));
        assert_eq!(config.metrics.labels, [("zone".to_owned(), written.to_owned())]);
    }
    // Numbers still read as numbers where a number belongs, and an error quotes what was written.
    assert_eq!(
        load("event_broker:\n  worker_count: 0x10\n  retry_policy:\n    backoff_factor: 1e0\n").worker_count,
        16
    );
    let err = error("event_broker:\n  worker_count: 4.0\n");
    assert_eq!(err.reason(), "expected a whole number, got 4.0");
}

#[test]
fn unknown_keys_are_reported_with_their_path() {
    let err = error("event_broker:\n  worker_cuont: 3\n");
    assert_eq!(err.key(), "event_broker.worker_cuont");
    assert!(err.reason().starts_with("unknown key; expected enabled, provider, mode, worker_count"), "{err}");
    let err = error("event_broker:\n  retry_policy:\n    max_retry: 3\n");
    assert_eq!(err.key(), "event_broker.retry_policy.max_retry");
    assert!(err.reason().contains("max_retries"), "{err}");
    let err = error("event_broker:\n  redis:\n    hots: cache\n");
    assert_eq!(err.key(), "event_broker.redis.hots");
    assert!(err.reason().contains("host"), "{err}");
}

#[test]
fn invalid_yaml_and_a_missing_section_say_where() {
    let err = error("event_broker:\n  mode: [async\n");
    assert!(err.key().starts_with("line "), "{err}");
    assert!(err.reason().starts_with("invalid YAML"), "{err}");
    let err = error("server:\n  port: 80\n");
    assert_eq!(err.key(), "event_broker");
    assert!(err.reason().starts_with("missing"), "{err}");
    let err = error("event_broker: {}\n---\nother: {}\n");
    assert!(err.reason().contains("2 YAML documents"), "{err}");
}

#[test]
fn variables_expand_in_values() {
    let yaml = r#"
event_broker:
  worker_count: ${WORKERS:-3}
  buffer_size: "${BUFFER}"
  instance_id: "${POD}-${ZONE:-eu}"
  redis:
    password: "${REDIS_PASSWORD}"
    host: "$${literal}"
"#;
    let config =
        load_with(yaml, &[("BUFFER", "4096"), ("POD", "api-7"), ("REDIS_PASSWORD", "s3cret")]).unwrap();
    assert_eq!(config.worker_count, 3);
    assert_eq!(config.buffer_size, 4096);
    assert_eq!(config.instance_id, "api-7-eu");
    assert_eq!(config.redis.password.as_deref(), Some("s3cret"));
    assert_eq!(config.redis.host.as_deref(), Some("${literal}"));

    let config =
        load_with(yaml, &[("WORKERS", "8"), ("BUFFER", "64"), ("POD", "p"), ("ZONE", "us")]).unwrap();
    assert_eq!((config.worker_count, config.buffer_size), (8, 64));
    assert_eq!(config.instance_id, "p-us");
    assert_eq!(config.redis.password, None, "an unset variable expands to nothing");

    let err = load_with(yaml, &[("BUFFER", "lots"), ("POD", "p")]).unwrap_err();
    assert_eq!(err.key(), "event_broker.buffer_size");
    assert!(err.reason().contains(r#"got "lots""#), "{err}");
}

#[test]
fn the_process_environment_is_read_by_default() {
    let path = std::env::var("PATH").expect("PATH is set in a test process");
    let config = Config::from_yaml_str("event_broker:\n  redis:\n    password: \"${PATH}\"\n").unwrap();
    assert_eq!(config.redis.password.as_deref(), Some(path.as_str()));
}

#[test]
fn an_unset_instance_id_falls_back_to_the_host_name() {
    let config = load_with(QUICK_START, &[]).unwrap();
    assert_eq!(config.instance_id, "", "an unset HOSTNAME expands to nothing");
    let broker = config.build().unwrap();
    assert!(!broker.instance_id().is_empty());
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

#[test]
fn overrides_replace_keys_at_any_depth() {
    let vars = [
        ("EVENTBROKER_WORKER_COUNT", "4"),
        ("EVENTBROKER_MODE", "sync"),
        ("EVENTBROKER_RETRY_POLICY_MAX_RETRIES", "0"),
        ("EVENTBROKER_REDIS_HOST", "cache.internal"),
        ("EVENTBROKER_NATS_STORAGE", "memory"),
        ("EVENTBROKER_METRICS_ENABLED", "false"),
        ("EVENTBROKER_METRICS_LABELS", "broker=orders, zone = eu,"),
        ("HOSTNAME", "h"),
    ];
    let config = load_with(QUICK_START, &vars).unwrap();
    assert_eq!(config.worker_count, 4, "the override wins over the file's 10");
    assert_eq!(config.mode, Mode::Sync);
    assert_eq!(config.retry_policy.max_retries, 0);
    assert_eq!(config.redis.host.as_deref(), Some("cache.internal"));
    assert_eq!(config.nats.storage, Some(NatsStorageKind::Memory));
    assert!(!config.metrics.enabled);
    assert_eq!(
        config.metrics.labels,
        [("broker".to_owned(), "orders".to_owned()), ("zone".to_owned(), "eu".to_owned())]
    );
    assert_eq!(config.buffer_size, 1000, "keys without an override keep the file's value");

    let from_env = Config::from_env_with(&Env::from_vars([("EVENTBROKER_BUFFER_SIZE", "64")])).unwrap();
    assert_eq!(from_env.buffer_size, 64);
}

#[test]
fn bad_overrides_name_the_variable() {
    let err = load_with(QUICK_START, &[("EVENTBROKER_METRICS_LABELS", "broker")]).unwrap_err();
    assert_eq!(err.key(), "event_broker.metrics.labels");
    assert_eq!(
        err.reason(),
        r#"expected name=value pairs separated by commas, got "broker" (from EVENTBROKER_METRICS_LABELS)"#
    );
    let err = load_with(QUICK_START, &[("EVENTBROKER_MODE", "asnyc")]).unwrap_err();
    assert_eq!(err.key(), "event_broker.mode");
    assert_eq!(err.reason(), r#"expected sync or async, got "asnyc" (from EVENTBROKER_MODE)"#);
    let err = load_with(QUICK_START, &[("EVENTBROKER_RETRY_POLICY_MAX_RETRY", "0")]).unwrap_err();
    assert_eq!(err.key(), "EVENTBROKER_RETRY_POLICY_MAX_RETRY");
    assert!(err.reason().contains("no configuration key"), "{err}");
    assert!(err.reason().contains("EVENTBROKER_RETRY_POLICY_MAX_RETRIES"), "names the valid ones: {err}");
    assert!(!err.reason().contains("EVENTBROKER_REDIS_"), "of its own section only: {err}");
    let err = load_with(QUICK_START, &[("EVENTBROKER_REDIS_HOTS", "cache")]).unwrap_err();
    assert_eq!(err.key(), "EVENTBROKER_REDIS_HOTS");
    assert!(err.reason().contains("EVENTBROKER_REDIS_HOST"), "{err}");
    let err = load_with(QUICK_START, &[("EVENTBROKER_DATABASE_TABLENAME", "events")]).unwrap_err();
    assert!(err.reason().contains("EVENTBROKER_DATABASE_TABLE_NAME"), "{err}");
    // Outside the sections the prefix is shared with other tools (this crate's tests use
    // EVENTBROKER_TEST_REDIS_URL): logged and ignored.
    let config =
        load_with(QUICK_START, &[("EVENTBROKER_TEST_REDIS_URL", "redis://127.0.0.1"), ("HOSTNAME", "h")]);
    assert_eq!(config.unwrap().worker_count, 10);
}

/// A value that converts but is out of range names the variable it came from as a value that
/// does not convert does: the file may say `worker_count: 4`.
#[test]
fn an_override_out_of_range_names_its_variable() {
    let err = load_with(QUICK_START, &[("EVENTBROKER_WORKER_COUNT", "0")]).unwrap_err();
    assert_eq!(err.key(), "event_broker.worker_count");
    assert_eq!(err.reason(), "must be between 1 and 1024, got 0 (from EVENTBROKER_WORKER_COUNT)");
    let err = load_with(QUICK_START, &[("EVENTBROKER_MEMORY_CLEANUP_INTERVAL", "0")]).unwrap_err();
    assert_eq!(err.key(), "event_broker.memory.cleanup_interval");
    assert!(err.reason().ends_with("(from EVENTBROKER_MEMORY_CLEANUP_INTERVAL)"), "{err}");
    let err = Config::from_env_with(&Env::from_vars([("EVENTBROKER_RETRY_POLICY_JITTER", "2")])).unwrap_err();
    assert_eq!(err.key(), "event_broker.retry_policy.jitter");
    assert!(err.reason().ends_with("(from EVENTBROKER_RETRY_POLICY_JITTER)"), "{err}");
    // Named once, and only for the variable's own key.
    let err = load_with(QUICK_START, &[("EVENTBROKER_WORKER_COUNT", "many")]).unwrap_err();
    assert_eq!(err.reason().matches("(from ").count(), 1, "{err}");
    let err =
        load_with("event_broker:\n  worker_count: 0\n", &[("EVENTBROKER_BUFFER_SIZE", "8")]).unwrap_err();
    assert!(!err.reason().contains("(from "), "{err}");
}

#[test]
fn files_load_and_their_errors_name_them() {
    let dir = std::env::temp_dir().join(format!("eventbroker-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, "event_broker:\n  mode: sync\n").unwrap();
    let config = Config::from_yaml_file(&path).unwrap();
    assert_eq!(config.mode, Mode::Sync);
    // What is wrong inside a file names the file: a service may read several.
    let shown = path.display().to_string();
    for (yaml, key) in [("event_broker:\n  mode: later\n", "event_broker.mode"), ("event_broker: [\n", "")] {
        std::fs::write(&path, yaml).unwrap();
        let err = Config::from_yaml_file(&path).unwrap_err();
        assert_eq!(err.file(), Some(shown.as_str()), "{err}");
        assert!(err.to_string().contains(&format!(" in {shown}: ")), "{err}");
        assert!(err.key().starts_with(key), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let err = Config::from_yaml_file(&path).unwrap_err();
    assert_eq!(err.key(), path.display().to_string());
    assert!(err.reason().starts_with("cannot read the file"), "{err}");
}

/// The instance id names the worker threads: one with a NUL, given in code, is refused as a bad
/// setting rather than panicking in the thread spawn.
#[test]
fn an_instance_id_with_a_control_character_is_refused_not_a_panic() {
    let mut config = Config::default();
    config.worker_count = 1;
    config.instance_id = "api\0one".into();
    match config.build() {
        Err(BuildError::Config(err)) => assert_eq!(err.key(), "instance_id", "{err}"),
        other => panic!("expected a config error on instance_id, got {other:?}"),
    }
}

#[test]
fn a_disabled_configuration_builds_no_broker() {
    let config = load("event_broker:\n  enabled: false\n");
    assert!(matches!(config.build(), Err(BuildError::Disabled)));
}

#[test]
fn a_configured_broker_delivers() {
    let config = load("event_broker:\n  worker_count: 2\n  retry_policy:\n    max_retries: 0\n");
    let broker = config.build().unwrap();
    let (_, events) = broker.subscribe_stream("public.users.*").unwrap();
    broker
        .publish(eventbroker::Event::for_entity(
            eventbroker::EventSource::Database,
            "public",
            "users",
            "create",
        ))
        .unwrap();
    broker.drain(Duration::from_secs(10)).unwrap();
    assert_eq!(events.try_recv().unwrap().event_type, "public.users.create");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// Without a provider's feature, building names the feature; run by `scripts/test` with only the
/// `yaml` feature.
#[cfg(not(feature = "redis"))]
#[test]
fn a_provider_whose_feature_is_off_names_the_feature() {
    let config = load("event_broker:\n  provider: redis\n");
    match config.build() {
        Err(BuildError::MissingFeature { key, feature }) => {
            assert_eq!((key.as_str(), feature), ("event_broker.provider", "redis"));
        }
        other => panic!("expected MissingFeature, got {other:?}"),
    }
}

#[cfg(not(feature = "metrics"))]
#[test]
fn metrics_without_their_feature_name_the_feature() {
    let config = load("event_broker:\n  metrics:\n    enabled: true\n");
    assert!(matches!(config.build(), Err(BuildError::MissingFeature { feature: "metrics", .. })));
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[path = "redis_support/mod.rs"]
mod redis_support;

#[cfg(all(feature = "postgres", feature = "test-util"))]
#[path = "postgres_support/mod.rs"]
mod postgres_support;

/// Builds a broker from `yaml`, publishes through it, drains, and reads the event back from the
/// provider the factory made.
#[cfg(all(feature = "test-util", any(feature = "redis", feature = "nats", feature = "postgres")))]
fn delivers_and_stores(yaml: &str) {
    let config = load(yaml);
    let broker = config.build().unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let (_, events) = broker.subscribe_stream("public.users.*").unwrap();
    let event =
        eventbroker::Event::for_entity(eventbroker::EventSource::Database, "public", "users", "create");
    let id = event.id;
    broker.publish(event).unwrap();
    broker.drain(Duration::from_secs(30)).unwrap();
    assert_eq!(events.try_recv().unwrap().id, id);
    let stored = broker.provider().get(id).unwrap().expect("stored by the configured provider");
    assert_eq!(stored.status, eventbroker::EventStatus::Completed);
    let report = broker.shutdown(Duration::from_secs(30));
    assert!(report.is_clean(), "{report:?}");
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[test]
fn the_factory_builds_the_redis_provider_from_its_section() {
    let backend = redis_support::RedisBackend::new();
    delivers_and_stores(&format!(
        "event_broker:\n  provider: redis\n  worker_count: 1\n  redis:\n    url: {}\n    key_prefix: \"{}\"\n    stream_name: \"resolvespec:events\"\n    consumer_group: resolvespec-workers\n",
        redis_support::url(),
        backend.prefix(),
    ));
}

/// The factory connects as the NATS and PostgreSQL ones do: a publish-only instance (`local`, no
/// inbound source to open) pointed at no server fails to build, within the section's timeout,
/// rather than building and failing at its first write.
#[cfg(feature = "redis")]
#[test]
fn a_redis_section_that_cannot_connect_fails_the_build() {
    let config = load(
        "event_broker:\n  provider: redis\n  worker_count: 1\n  distribution:\n    mode: local\n  redis:\n    host: 127.0.0.1\n    port: 1\n    timeout: 1s\n",
    );
    let started = std::time::Instant::now();
    match config.build() {
        Err(BuildError::Provider(err)) => assert_eq!(err.provider(), "redis", "{err}"),
        other => panic!("expected a provider error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}

#[cfg(all(feature = "postgres", feature = "test-util"))]
#[test]
fn the_factory_builds_the_postgres_provider_from_its_section() {
    let backend = postgres_support::PostgresBackend::new();
    delivers_and_stores(&format!(
        "event_broker:\n  provider: database\n  worker_count: 1\n  database:\n    url: \"{}\"\n    schema: {}\n    table_name: events\n    channel: resolvespec_events\n",
        postgres_support::url(),
        backend.schema,
    ));
}

#[cfg(all(feature = "nats", feature = "test-util"))]
#[test]
fn the_factory_builds_the_nats_provider_from_its_section() {
    // The backend's streams, removed when it drops; the broker connects with the section's values.
    let backend = eventbroker::provider::nats::NatsBackend::new();
    let layout = backend.config();
    delivers_and_stores(&format!(
        "event_broker:\n  provider: nats\n  worker_count: 1\n  nats:\n    url: \"{}\"\n    stream_name: {}\n    subject_prefix: {}\n    storage: memory\n",
        eventbroker::provider::nats::NatsBackend::url(),
        layout.stream_name,
        layout.subject_prefix,
    ));
}

/// A password holds whatever characters it likes: built into a URL, each part is percent-encoded
/// (the clients decode it), so `/`, `#`, `?` and `@` neither end the password nor move the host.
#[test]
fn url_parts_with_reserved_characters_are_encoded() {
    let config = load(concat!(
        "event_broker:\n",
        "  redis:\n    username: app\n    password: \"p/ss#w?rd@x%\"\n    host: \"::1\"\n",
        "  database:\n    user: \"svc@eu\"\n    password: \"a:b/c\"\n    host: /var/run/postgresql\n",
    ));
    assert_eq!(config.redis.url().as_deref(), Some("redis://app:p%2Fss%23w%3Frd%40x%25@[::1]:6379/0"));
    assert_eq!(
        config.database.url().as_deref(),
        Some("postgres://svc%40eu:a%3Ab%2Fc@%2Fvar%2Frun%2Fpostgresql:5432/postgres")
    );
}

/// Asserts that `secret` is nowhere in `error`'s `Display` or `Debug`, nor in its source chain's.
fn assert_hidden(error: &(dyn std::error::Error + 'static), secret: &str) {
    let mut next = Some(error);
    while let Some(error) = next {
        assert!(!error.to_string().contains(secret), "{secret:?} is in the error: {error}");
        assert!(!format!("{error:?}").contains(secret), "{secret:?} is in the error's Debug: {error:?}");
        next = error.source();
    }
}

/// `Debug` of a configuration shows every setting but the secrets: passwords, the NATS token and
/// `NKey` seed as `***`, and the credentials in URLs blanked.
#[test]
fn debug_shows_no_secret() {
    let with_parts = load(concat!(
        "event_broker:\n",
        "  redis:\n    username: app\n    password: hunter2\n    host: cache\n",
        "  nats:\n    url: \"nats://u:hunter2@n1:4222, nats://hunter2@n2:4222\"\n    user: svc\n    password: hunter2\n",
        "  database:\n    user: svc\n    password: hunter2\n    host: db\n",
    ));
    let with_urls = load(concat!(
        "event_broker:\n",
        "  redis:\n    url: \"rediss://app:hunter2@cache:6380/2\"\n",
        "  nats:\n    token: hunter2\n",
        "  database:\n    url: \"host=db user=svc password='hunter2' dbname=app\"\n",
    ));
    let with_nkey = load("event_broker:\n  nats:\n    nkey: SUAhunter2\n");
    for config in [&with_parts, &with_urls, &with_nkey] {
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password: None") || shown.contains("password: Some(\"***\")"), "{shown}");
    }
    let shown = format!("{:?}", with_parts.nats);
    assert!(shown.contains("user: Some(\"svc\"), password: Some(\"***\"), token: None"), "{shown}");
    assert!(shown.contains("n1:4222") && shown.contains("n2:4222"), "the servers are shown: {shown}");
    let shown = format!("{:?}", with_urls.database);
    assert!(shown.contains("host=db user=svc password=*** dbname=app"), "{shown}");
    assert!(format!("{:?}", with_urls.redis).contains("rediss://app:***@cache:6380/2"));
}

/// A value that is refused is quoted in the error with its credentials blanked, whether it comes
/// from the document or an override variable; a secret's own value is not quoted at all.
#[test]
fn errors_quote_no_secret() {
    for yaml in [
        "event_broker:\n  redis:\n    url: \"http://app:hunter2@cache\"\n",
        "event_broker:\n  redis:\n    url: \"app:hunter2@cache:6379\"\n",
        "event_broker:\n  redis: \"redis://app:hunter2@cache\"\n",
        "event_broker:\n  nats:\n    url: \"nats://a:4222,http://hunter2@b:4222\"\n",
        "event_broker:\n  database:\n    url: \"mysql://svc:hunter2@db/app\"\n",
        "event_broker:\n  redis:\n    password: \"hunter2${oops\"\n",
        "event_broker:\n  nats:\n    token: \"hunter2${no-name}\"\n",
        "event_broker:\n  redis:\n    url: \"redis://app:hunter2@cache/${DB\"\n",
    ] {
        assert_hidden(&error(yaml), "hunter2");
    }
    let err =
        load_with("event_broker:\n", &[("EVENTBROKER_REDIS_URL", "http://app:hunter2@cache")]).unwrap_err();
    assert_eq!(err.key(), "event_broker.redis.url");
    assert!(err.reason().contains("\"http://app:***@cache\""), "{err}");
    assert_hidden(&err, "hunter2");
}

/// A build that cannot reach its server (nothing listens on port 1) fails without showing the
/// credentials it was given.
#[cfg(any(feature = "redis", feature = "nats", feature = "postgres"))]
#[test]
fn a_build_that_cannot_connect_shows_no_secret() {
    let sections = [
        #[cfg(feature = "redis")]
        "provider: redis\n  redis:\n    url: \"redis://app:hunter2@127.0.0.1:1/0\"\n    timeout: 1s\n",
        #[cfg(feature = "nats")]
        "provider: nats\n  nats:\n    url: \"nats://svc:hunter2@127.0.0.1:1\"\n    connect_timeout: 1s\n",
        #[cfg(feature = "nats")]
        "provider: nats\n  nats:\n    url: \"nats://hunter2@127.0.0.1:1\"\n    connect_timeout: 1s\n",
        #[cfg(feature = "postgres")]
        "provider: database\n  database:\n    url: \"postgresql://svc:hunter2@127.0.0.1:1/test\"\n    connect_timeout: 1s\n",
        #[cfg(feature = "postgres")]
        "provider: database\n  database:\n    password: hunter2\n    host: 127.0.0.1\n    port: 1\n",
    ];
    for section in sections {
        let config =
            load(&format!("event_broker:\n  worker_count: 1\n  distribution:\n    mode: local\n  {section}"));
        match config.build() {
            Err(err @ BuildError::Provider(_)) => assert_hidden(&err, "hunter2"),
            other => panic!("expected a provider error, got {other:?}"),
        }
    }
}
