//! What the Redis test binaries share: a [`TestBackend`] on a fresh key prefix of the Redis on
//! 127.0.0.1:6379 (or `EVENTBROKER_TEST_REDIS_URL`, loopback only), which deletes its keys when
//! dropped, and a raw connection for looking behind the provider's back.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::sync::Arc;
use std::time::Duration;

use eventbroker::testing::conformance::TestBackend;
use eventbroker::{EventId, Provider, RedisConfig, RedisProvider};

/// The server under test.
pub fn url() -> String {
    let url = std::env::var("EVENTBROKER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    assert!(
        url.contains("://127.")
            || url.contains("://localhost")
            || url.contains("@127.")
            || url.contains("[::1]"),
        "tests only talk to a loopback Redis, not {url}"
    );
    url
}

/// A connection of our own to the server under test.
pub fn raw() -> redis::Connection {
    let client = redis::Client::open(url()).expect("a valid URL");
    let conn = client.get_connection_with_timeout(Duration::from_secs(5)).unwrap_or_else(|error| {
        panic!("Redis is not answering on {}: {error} (run scripts/ensure-service redis)", url())
    });
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("set a timeout");
    conn
}

/// A fresh namespace on the server: every handle from `connect` is a separate provider (its own
/// connections, as another process would have) on the same key prefix.
pub struct RedisBackend {
    config: RedisConfig,
}

impl RedisBackend {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    /// A backend whose configuration `adjust` changes first.
    pub fn with(adjust: impl FnOnce(&mut RedisConfig)) -> Self {
        let mut config = RedisConfig {
            key_prefix: format!("ebtest:{}", EventId::new().as_uuid().simple()),
            max_backoff: Duration::from_millis(200),
            client_name: "eventbroker-test".into(),
            ..RedisConfig::new(url())
        };
        adjust(&mut config);
        Self { config }
    }

    pub fn config(&self) -> RedisConfig {
        self.config.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.config.key_prefix
    }

    pub fn provider(&self) -> RedisProvider {
        RedisProvider::connect(self.config()).expect("a valid configuration")
    }

    /// The key of the event stream.
    pub fn stream(&self) -> String {
        format!("{}:{}", self.config.key_prefix, self.config.stream)
    }
}

impl TestBackend for RedisBackend {
    fn connect(&self) -> Arc<dyn Provider> {
        Arc::new(self.provider())
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        delete_prefix(&self.config.key_prefix);
    }
}

/// Deletes every key under `prefix:`; best effort (a test that already failed must not panic in
/// its cleanup).
pub fn delete_prefix(prefix: &str) {
    let Ok(client) = redis::Client::open(url()) else { return };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else { return };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut cursor: u64 = 0;
    // Bounded: a SCAN pass over any keyspace this machine holds ends well before this.
    for _ in 0..100_000 {
        let Ok((next, keys)) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query::<(u64, Vec<String>)>(&mut conn)
        else {
            return;
        };
        if !keys.is_empty() {
            let _ = redis::cmd("UNLINK").arg(&keys).exec(&mut conn);
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
