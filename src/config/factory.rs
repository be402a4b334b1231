//! The factory: the provider a configuration names, built from its section, and the metrics
//! settings — or an error naming the cargo feature that is missing.
//!
//! Each provider has its own small function, compiled with its feature, that maps its section onto
//! the provider's configuration; without the feature, the same name returns
//! [`BuildError::MissingFeature`].

use std::sync::Arc;

use super::{Config, ProviderKind};
use crate::broker::BrokerBuilder;
use crate::error::BuildError;
use crate::metrics::MetricsConfig;
use crate::provider::{MemoryProvider, Provider};

/// The provider `config` names.
pub(super) fn provider(config: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    match config.provider {
        ProviderKind::Memory => Ok(Arc::new(MemoryProvider::new(config.memory.clone()))),
        ProviderKind::Redis => redis(config),
        ProviderKind::Nats => nats(config),
        ProviderKind::Database => postgres(config),
    }
}

#[cfg(not(all(feature = "redis", feature = "nats", feature = "postgres")))]
fn missing(feature: &'static str) -> BuildError {
    BuildError::MissingFeature { key: "event_broker.provider".into(), feature }
}

#[cfg(not(feature = "redis"))]
fn redis(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    Err(missing("redis"))
}

/// The Redis Streams provider from the `redis` section; unset fields keep the provider's
/// defaults. Connects (bounded by the section's `timeout`): the provider itself connects on first
/// use, so without this ping a broker that only publishes (`distribution: local`) would build
/// against a wrong address or password and fail at its first write, as the others never do.
#[cfg(feature = "redis")]
fn redis(config: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    use crate::provider::redis::{RedisConfig, RedisProvider};
    let section = &config.redis;
    let mut redis = RedisConfig::default();
    set(&mut redis.url, section.url());
    set(&mut redis.stream, section.stream_name.clone());
    set(&mut redis.key_prefix, section.key_prefix.clone());
    set(&mut redis.max_len, section.max_len);
    set(&mut redis.status_ttl, section.status_ttl);
    set(&mut redis.max_dead_letters, section.max_dead_letters);
    set(&mut redis.timeout, section.timeout);
    set(&mut redis.client_name, section.client_name.clone());
    let provider = RedisProvider::connect(redis).map_err(BuildError::Provider)?;
    provider.ping().map_err(BuildError::Provider)?;
    Ok(Arc::new(provider))
}

#[cfg(not(feature = "nats"))]
fn nats(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    Err(missing("nats"))
}

/// The NATS `JetStream` provider from the `nats` section; unset fields keep the provider's
/// defaults. Connects (bounded by the section's `connect_timeout`) and creates its streams when
/// missing.
#[cfg(feature = "nats")]
fn nats(config: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    use super::sections::NatsStorageKind;
    use crate::provider::nats::{NatsAuth, NatsConfig, NatsProvider, NatsStorage, NatsTls};
    let section = &config.nats;
    let mut nats = NatsConfig::default();
    set(&mut nats.url, section.url.clone());
    set(&mut nats.stream_name, section.stream_name.clone());
    set(&mut nats.subject_prefix, section.subject_prefix.clone());
    set(&mut nats.client_name, section.client_name.clone());
    set(&mut nats.replicas, section.replicas);
    set(&mut nats.max_age, section.max_age);
    if section.max_bytes.is_some() {
        nats.max_bytes = section.max_bytes;
    }
    set(&mut nats.duplicate_window, section.duplicate_window);
    set(&mut nats.connect_timeout, section.connect_timeout);
    set(&mut nats.request_timeout, section.request_timeout);
    if let Some(storage) = section.storage {
        nats.storage = match storage {
            NatsStorageKind::Memory => NatsStorage::Memory,
            NatsStorageKind::File => NatsStorage::File,
        };
    }
    // The section allows one way to authenticate; `read` checked it.
    if let (Some(user), Some(password)) = (&section.user, &section.password) {
        nats.auth = NatsAuth::UserPassword { user: user.clone(), password: password.clone() };
    } else if let Some(token) = &section.token {
        nats.auth = NatsAuth::Token(token.clone());
    } else if let Some(seed) = &section.nkey {
        nats.auth = NatsAuth::NKey(seed.clone());
    } else if let Some(file) = &section.credentials_file {
        nats.auth = NatsAuth::CredentialsFile(file.clone());
    }
    let files = section.ca_file.is_some() || section.cert_file.is_some();
    if section.tls == Some(true) || files {
        nats.tls = Some(NatsTls {
            required: section.tls.unwrap_or(true),
            root_certificates: section.ca_file.clone(),
            client_certificate: section.cert_file.clone().zip(section.key_file.clone()),
            ..NatsTls::default()
        });
    }
    Ok(Arc::new(NatsProvider::connect(nats).map_err(BuildError::Provider)?))
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    Err(missing("postgres"))
}

/// The PostgreSQL provider from the `database` section; unset fields keep the provider's
/// defaults. Connects (bounded by the section's `connect_timeout`) and creates its tables when
/// missing.
#[cfg(feature = "postgres")]
fn postgres(config: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    use crate::provider::postgres::{PostgresConfig, PostgresProvider};
    let section = &config.database;
    let mut postgres = PostgresConfig::default();
    set(&mut postgres.url, section.url());
    set(&mut postgres.schema, section.schema.clone());
    set(&mut postgres.table, section.table_name.clone());
    if section.channel.is_some() {
        postgres.channel.clone_from(&section.channel);
    }
    set(&mut postgres.pool_size, section.pool_size);
    set(&mut postgres.poll_interval, section.poll_interval);
    set(&mut postgres.max_age, section.max_age);
    set(&mut postgres.connect_timeout, section.connect_timeout);
    set(&mut postgres.operation_timeout, section.operation_timeout);
    set(&mut postgres.application_name, section.application_name.clone());
    Ok(Arc::new(PostgresProvider::connect(postgres).map_err(BuildError::Provider)?))
}

#[cfg(any(feature = "redis", feature = "nats", feature = "postgres"))]
fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

/// Adds the metrics settings to `builder`.
#[cfg(feature = "metrics")]
#[allow(clippy::unnecessary_wraps, reason = "the signature of the variant without the feature, which fails")]
pub(super) fn with_metrics(
    builder: BrokerBuilder,
    metrics: &MetricsConfig,
) -> Result<BrokerBuilder, BuildError> {
    Ok(builder.metrics(metrics.clone()))
}

/// Without the `metrics` feature there is nothing to record with; asking for it is an error.
#[cfg(not(feature = "metrics"))]
pub(super) fn with_metrics(
    builder: BrokerBuilder,
    metrics: &MetricsConfig,
) -> Result<BrokerBuilder, BuildError> {
    if metrics.enabled {
        return Err(BuildError::MissingFeature {
            key: "event_broker.metrics.enabled".into(),
            feature: "metrics",
        });
    }
    Ok(builder)
}
