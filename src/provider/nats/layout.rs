//! The three streams a provider keeps, named from its configuration, and their idempotent set-up:
//! a stream that does not exist is created, one that exists with other settings is updated to
//! this provider's (keeping every setting it does not manage), and one whose storage differs is
//! refused — storage cannot change in place.

use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, stream};

use super::config::{NatsConfig, NatsStorage};
use super::connection::{Empty, api, refused};
use crate::error::{ProviderError, ProviderErrorKind};

/// Names and subjects of everything the provider keeps on the server.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// The event stream.
    pub(super) events: String,
    /// Subject prefix of the events (`<prefix>.<type>`).
    pub(super) prefix: String,
    /// The stream behind the status bucket: `KV_<bucket>`.
    pub(super) statuses: String,
    /// Subject prefix of the status records, dot included: `$KV.<bucket>.`.
    pub(super) status_prefix: String,
    /// The dead-letter stream.
    pub(super) letters: String,
    /// Subject prefix of the dead letters, dot included.
    pub(super) letter_prefix: String,
}

impl Layout {
    pub(super) fn new(config: &NatsConfig) -> Self {
        let bucket = config.status_bucket();
        Self {
            events: config.stream_name.clone(),
            prefix: config.subject_prefix.clone(),
            statuses: format!("KV_{bucket}"),
            status_prefix: format!("$KV.{bucket}."),
            letters: config.dead_letter_stream(),
            letter_prefix: format!("{}.", config.dead_letter_prefix()),
        }
    }

    /// The subject of the status record of event `id`.
    pub(super) fn status_subject(&self, id: impl std::fmt::Display) -> String {
        format!("{}{id}", self.status_prefix)
    }

    /// The subject of dead letter `id`.
    pub(super) fn letter_subject(&self, id: impl std::fmt::Display) -> String {
        format!("{}{id}", self.letter_prefix)
    }

    /// Creates or updates the three streams.
    pub(super) async fn ensure(
        &self,
        js: &jetstream::Context,
        config: &NatsConfig,
    ) -> Result<(), ProviderError> {
        let storage = match config.storage {
            NatsStorage::File => stream::StorageType::File,
            NatsStorage::Memory => stream::StorageType::Memory,
        };
        let max_age = config.max_age.unwrap_or(Duration::ZERO);
        let common = stream::Config {
            storage,
            num_replicas: config.replicas,
            max_age,
            duplicate_window: config.duplicate_window,
            allow_direct: true,
            max_bytes: -1,
            max_messages: -1,
            max_messages_per_subject: -1,
            max_consumers: -1,
            max_message_size: -1,
            ..stream::Config::default()
        };
        let events = stream::Config {
            name: self.events.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            max_bytes: config.max_bytes.and_then(|b| i64::try_from(b).ok()).unwrap_or(-1),
            ..common.clone()
        };
        // Laid out exactly as a KV bucket with history 1, so KV tools read it.
        let statuses = stream::Config {
            name: self.statuses.clone(),
            subjects: vec![format!("{}>", self.status_prefix)],
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            ..common.clone()
        };
        // One message per letter id: storing a letter again replaces it.
        let letters = stream::Config {
            name: self.letters.clone(),
            subjects: vec![format!("{}*", self.letter_prefix)],
            max_messages_per_subject: 1,
            ..common
        };
        for desired in [events, statuses, letters] {
            ensure_stream(js, desired).await?;
        }
        Ok(())
    }
}

/// The settings this provider manages, as one comparable value.
fn managed(config: &stream::Config) -> impl PartialEq + std::fmt::Debug + use<> {
    (
        config.subjects.clone(),
        config.num_replicas,
        config.max_age,
        config.max_bytes,
        config.duplicate_window,
        config.allow_direct,
        config.max_messages_per_subject,
        config.allow_rollup,
        config.deny_delete,
        config.discard,
    )
}

fn adopt_managed(existing: &mut stream::Config, desired: &stream::Config) {
    existing.subjects.clone_from(&desired.subjects);
    existing.num_replicas = desired.num_replicas;
    existing.max_age = desired.max_age;
    existing.max_bytes = desired.max_bytes;
    existing.duplicate_window = desired.duplicate_window;
    existing.allow_direct = desired.allow_direct;
    existing.max_messages_per_subject = desired.max_messages_per_subject;
    existing.allow_rollup = desired.allow_rollup;
    existing.deny_delete = desired.deny_delete;
    existing.discard = desired.discard;
}

/// Creates `desired`, or brings the existing stream of its name to it.
async fn ensure_stream(js: &jetstream::Context, desired: stream::Config) -> Result<(), ProviderError> {
    const OPERATION: &str = "connect";
    let name = desired.name.clone();
    // A second round covers a provider that created the stream between our info and create.
    for _ in 0..2 {
        let existing: Result<stream::Info, _> =
            api(js, OPERATION, format!("STREAM.INFO.{name}"), &Empty {}).await?;
        match existing {
            Ok(info) => {
                let mut config = info.config;
                if config.storage != desired.storage {
                    return Err(ProviderError::new(
                        "nats",
                        OPERATION,
                        ProviderErrorKind::InvalidInput(format!(
                            "stream {name} exists with {:?} storage; the configuration asks for {:?}, \
                             and storage cannot change in place",
                            config.storage, desired.storage
                        )),
                    ));
                }
                if managed(&config) == managed(&desired) {
                    return Ok(());
                }
                tracing::info!(stream = %name, "nats provider: updating the stream's settings");
                adopt_managed(&mut config, &desired);
                let updated: Result<stream::Info, _> =
                    api(js, OPERATION, format!("STREAM.UPDATE.{name}"), &config).await?;
                return updated
                    .map(drop)
                    .map_err(|error| refused(OPERATION, &format!("update stream {name}"), &error));
            }
            Err(error) if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                let created: Result<stream::Info, _> =
                    api(js, OPERATION, format!("STREAM.CREATE.{name}"), &desired).await?;
                match created {
                    Ok(_) => return Ok(()),
                    Err(error) if error.error_code() == ErrorCode::STREAM_NAME_EXIST => {}
                    Err(error) => return Err(refused(OPERATION, &format!("create stream {name}"), &error)),
                }
            }
            Err(error) => return Err(refused(OPERATION, &format!("stream {name} info"), &error)),
        }
    }
    Err(ProviderError::new(
        "nats",
        OPERATION,
        ProviderErrorKind::Unavailable(format!("stream {name} kept changing while it was set up")),
    ))
}
