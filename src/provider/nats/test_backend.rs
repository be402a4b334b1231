//! The NATS provider as a conformance [`TestBackend`] (feature `test-util`).

use std::sync::Arc;
use std::time::Duration;

use super::{NatsConfig, NatsProvider};
use crate::event::EventId;
use crate::provider::Provider;
use crate::testing::conformance::TestBackend;

/// A fresh layout on a real server for one test: streams `EBT<random>`, `EBT<random>_STATUS` and
/// `EBT<random>_DLQ`, subjects `ebt<random>.>`. Every [`connect`](TestBackend::connect) opens a
/// provider with a connection of its own, as separate processes would; dropping the backend
/// deletes the streams.
///
/// The server is `EVENTBROKER_NATS_URL`, or `nats://127.0.0.1:4222`. A server that cannot be
/// reached fails the test: nothing is skipped silently.
///
/// ```no_run
/// use eventbroker::provider::nats::NatsBackend;
///
/// eventbroker::conformance_suite!(nats, NatsBackend::new);
/// ```
#[derive(Debug)]
pub struct NatsBackend {
    config: NatsConfig,
}

impl NatsBackend {
    /// The server the tests use: `EVENTBROKER_NATS_URL`, or `nats://127.0.0.1:4222`.
    pub fn url() -> String {
        std::env::var("EVENTBROKER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
    }

    /// A backend on a fresh layout with the default settings (timeouts shortened for tests).
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    /// A backend on a fresh layout, with `change` applied to its settings.
    pub fn with(change: impl FnOnce(&mut NatsConfig)) -> Self {
        let unique = EventId::new().as_uuid().simple().to_string();
        let mut config = NatsConfig {
            stream_name: format!("EBT{unique}"),
            subject_prefix: format!("ebt{unique}"),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ..NatsConfig::new(Self::url())
        };
        change(&mut config);
        Self { config }
    }

    /// The settings every handle connects with.
    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// A provider of its own type, for tests that need more than the trait.
    ///
    /// # Panics
    /// If the server cannot be reached.
    pub fn provider(&self) -> NatsProvider {
        // A server shared by tests that create and delete streams side by side can fail a create
        // while another test deletes the last stream (the server removes the account's stream
        // directory, and the create finds it gone: "could not create storage directory", seen on
        // nats-server 2.9): tried again, the create makes the directory anew.
        let mut attempts = 0;
        loop {
            match NatsProvider::connect(self.config.clone()) {
                Ok(provider) => return provider,
                Err(error)
                    if attempts < 3 && error.to_string().contains("error creating store for stream") =>
                {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => panic!("cannot connect to NATS at {}: {error}", self.config.url),
            }
        }
    }
}

impl Default for NatsBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBackend for NatsBackend {
    fn connect(&self) -> Arc<dyn Provider> {
        Arc::new(self.provider())
    }
}

impl Drop for NatsBackend {
    fn drop(&mut self) {
        if let Err(error) = NatsProvider::connect(self.config.clone()).and_then(NatsProvider::destroy) {
            tracing::warn!(%error, stream = %self.config.stream_name, "nats test backend: cleanup failed");
        }
    }
}
