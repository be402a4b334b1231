//! The factory: the provider a configuration names, built from its section, and the metrics
//! settings — or an error naming the cargo feature that is missing.
//!
//! Each provider has its own small function, compiled with its feature; without it, the same
//! name returns [`BuildError::MissingFeature`].

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

fn missing(feature: &'static str) -> BuildError {
    BuildError::MissingFeature { key: "event_broker.provider".into(), feature }
}

#[cfg(not(feature = "redis"))]
fn redis(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    Err(missing("redis"))
}

#[cfg(feature = "redis")]
fn redis(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    // The Redis provider maps `config.redis` here once its module lands.
    Err(missing("redis"))
}

#[cfg(not(feature = "nats"))]
fn nats(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    Err(missing("nats"))
}

#[cfg(feature = "nats")]
fn nats(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    // The NATS provider maps `config.nats` here once its module lands.
    Err(missing("nats"))
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    Err(missing("postgres"))
}

#[cfg(feature = "postgres")]
fn postgres(_: &Config) -> Result<Arc<dyn Provider>, BuildError> {
    // The PostgreSQL provider maps `config.database` here once its module lands.
    Err(missing("postgres"))
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
