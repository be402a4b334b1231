//! Loads the seed's YAML configuration, with `${VAR}` expansion and `EVENTBROKER_*` overrides,
//! builds the broker and its provider from it, and runs the seed's quick start on it.
//!
//! ```text
//! cargo run --example config_yaml --features yaml
//! cargo run --example config_yaml --features yaml -- path/to/config.yaml
//! EVENTBROKER_WORKER_COUNT=4 EVENTBROKER_MODE=sync cargo run --example config_yaml --features yaml
//! ```

use std::time::Duration;

use eventbroker::config::Config;
use eventbroker::{Event, EventSource};

/// The seed's quick start and retry policy, as an application's `config.yaml` holds them beside
/// its own settings.
const CONFIG: &str = r#"
server:
  port: 8080            # the application's own; the broker reads only event_broker

event_broker:
  enabled: true
  provider: memory      # memory, redis, nats, database
  mode: async           # sync, async
  worker_count: 10
  buffer_size: 1000
  instance_id: "${HOSTNAME}"
  retry_policy:
    max_retries: 3
    initial_delay: 1s
    max_delay: 30s
    backoff_factor: 2.0
  memory:               # the memory provider's section; redis, nats and database have theirs
    max_events: 100000
    max_age: 1h
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = match std::env::args().nth(1) {
        Some(path) => Config::from_yaml_file(path)?,
        None => Config::from_yaml_str(CONFIG)?,
    };
    println!(
        "provider {} (at most {} events), mode {:?}, {} workers, {} events per shard, retries {} from {:?}",
        config.provider.as_str(),
        config.memory.max_events,
        config.mode,
        config.worker_count,
        config.buffer_size,
        config.retry_policy.max_retries,
        config.retry_policy.initial_delay,
    );

    // A bad value names its key: this is what a typo looks like.
    if let Err(error) = Config::from_yaml_str("event_broker:\n  mode: asnyc\n") {
        println!("a typo is reported: {error}");
    }

    let broker = config.build()?;
    println!("instance {}", broker.instance_id());
    broker.subscribe_infallible("public.users.create", |event: &Event| {
        println!("new user created: {}", event.payload_json().unwrap_or("{}"));
    })?;
    broker.subscribe_infallible("*.*.delete", |event: &Event| {
        println!("deleted: {}.{}", event.schema, event.entity);
    })?;
    let created = Event::for_entity(EventSource::Database, "public", "users", "create")
        .with_user_id(123)
        .with_session_id("session-456")
        .with_payload_value(serde_json::json!({"id": 123, "name": "John Doe"}));
    broker.publish(created)?;
    broker.publish(Event::for_entity(EventSource::Database, "public", "posts", "delete"))?;

    broker.drain(Duration::from_secs(5))?;
    let report = broker.shutdown(Duration::from_secs(5));
    println!("handled {} events; shut down cleanly: {}", broker.stats().processed, report.is_clean());
    Ok(())
}
