//! The process-wide default broker and the free functions over it, as the seed's package-level
//! API (`eventbroker.Initialize`, `Publish`, `Subscribe`, …).
//!
//! [`init`] builds the default broker from a [`Config`] once per process; [`global`] hands out a
//! handle to it; [`publish`], [`publish_async`], [`publish_sync`], [`subscribe`],
//! [`subscribe_infallible`], [`drain`] and [`shutdown`] forward to it. Before `init` each returns
//! its error's `NotInitialized` (the event handed back); a second `init` returns
//! [`InitError::AlreadyInitialized`]. The default broker lives as long as the process: statics are
//! never dropped, so call [`shutdown`] before exiting to drain and flush it.
//!
//! ```
//! use std::time::Duration;
//! use eventbroker::config::Config;
//! use eventbroker::{Event, EventSource};
//!
//! eventbroker::init(&Config::default())?;
//! eventbroker::subscribe_infallible("public.users.create", |event: &Event| {
//!     println!("new user: {:?}", event.payload_json());
//! })?;
//! eventbroker::publish(Event::for_entity(EventSource::Database, "public", "users", "create"))?;
//! let report = eventbroker::shutdown(Duration::from_secs(5))?;
//! assert!(report.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::OnceLock;
use std::time::Duration;

use crate::config::Config;
use crate::error::{
    BoxError, DrainError, InitError, NotInitialized, PublishError, SubscribeError, SyncPublishError,
};
use crate::{Broker, BrokerBuilder, Event, ShutdownReport, SubscriptionId};

static DEFAULT: OnceLock<Broker> = OnceLock::new();
/// Held while a default broker is built, so two `init` calls never build two.
static INIT: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Builds the default broker (and its provider) from `config` and returns a handle to it.
///
/// ```
/// use eventbroker::config::Config;
///
/// eventbroker::init(&Config::default())?;
/// let again = eventbroker::init(&Config::default());
/// assert!(matches!(again, Err(eventbroker::InitError::AlreadyInitialized { .. })));
/// # let _ = eventbroker::shutdown(std::time::Duration::from_secs(5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`InitError::AlreadyInitialized`] when a default broker exists; [`InitError::Build`] when the
/// broker cannot be built (a disabled configuration included).
pub fn init(config: &Config) -> Result<Broker, InitError> {
    init_with(|| config.build())
}

/// Builds the default broker with `builder`, for settings only code can give.
///
/// ```
/// let broker = eventbroker::init_builder(eventbroker::Broker::builder().workers(2).instance_id("api-1"))?;
/// assert_eq!(eventbroker::global()?.instance_id(), "api-1");
/// # let _ = broker.shutdown(std::time::Duration::from_secs(5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`init`].
pub fn init_builder(builder: BrokerBuilder) -> Result<Broker, InitError> {
    init_with(|| builder.build())
}

fn init_with(build: impl FnOnce() -> Result<Broker, crate::BuildError>) -> Result<Broker, InitError> {
    let _building = INIT.lock();
    if let Some(existing) = DEFAULT.get() {
        return Err(InitError::AlreadyInitialized { instance_id: existing.instance_id().to_owned() });
    }
    let broker = build()?;
    // Cannot fail: `INIT` is held and the cell was empty.
    let _ = DEFAULT.set(broker.clone());
    Ok(broker)
}

/// A handle to the default broker.
///
/// # Errors
/// [`NotInitialized`] before [`init`].
pub fn global() -> Result<Broker, NotInitialized> {
    DEFAULT.get().cloned().ok_or(NotInitialized)
}

/// [`Broker::publish`] on the default broker.
///
/// ```
/// use eventbroker::{Event, EventSource, PublishError, SyncPublishError};
///
/// // Before `init` the event is handed back.
/// let err = eventbroker::publish(Event::new(EventSource::System, "app.started")).unwrap_err();
/// assert!(matches!(err, SyncPublishError::Rejected(PublishError::NotInitialized(_))));
/// ```
///
/// # Errors
/// As [`Broker::publish`]; [`PublishError::NotInitialized`] (in
/// [`SyncPublishError::Rejected`]) before [`init`].
pub fn publish(event: Event) -> Result<(), SyncPublishError> {
    match DEFAULT.get() {
        Some(broker) => broker.publish(event),
        None => Err(PublishError::NotInitialized(Box::new(event)).into()),
    }
}

/// [`Broker::publish_async`] on the default broker.
///
/// # Errors
/// As [`Broker::publish_async`]; [`PublishError::NotInitialized`] before [`init`].
pub fn publish_async(event: Event) -> Result<(), PublishError> {
    match DEFAULT.get() {
        Some(broker) => broker.publish_async(event),
        None => Err(PublishError::NotInitialized(Box::new(event))),
    }
}

/// [`Broker::publish_sync`] on the default broker.
///
/// # Errors
/// As [`Broker::publish_sync`]; [`PublishError::NotInitialized`] (in
/// [`SyncPublishError::Rejected`]) before [`init`].
pub fn publish_sync(event: Event) -> Result<(), SyncPublishError> {
    match DEFAULT.get() {
        Some(broker) => broker.publish_sync(event),
        None => Err(PublishError::NotInitialized(Box::new(event)).into()),
    }
}

/// [`Broker::subscribe`] on the default broker.
///
/// # Errors
/// As [`Broker::subscribe`]; [`SubscribeError::NotInitialized`] before [`init`].
pub fn subscribe<F, E>(pattern: &str, handler: F) -> Result<SubscriptionId, SubscribeError>
where
    F: Fn(&Event) -> Result<(), E> + Send + Sync + 'static,
    E: Into<BoxError>,
{
    DEFAULT.get().ok_or(SubscribeError::NotInitialized)?.subscribe(pattern, handler)
}

/// [`Broker::subscribe_infallible`] on the default broker.
///
/// # Errors
/// As [`Broker::subscribe`]; [`SubscribeError::NotInitialized`] before [`init`].
pub fn subscribe_infallible<F>(pattern: &str, handler: F) -> Result<SubscriptionId, SubscribeError>
where
    F: Fn(&Event) + Send + Sync + 'static,
{
    DEFAULT.get().ok_or(SubscribeError::NotInitialized)?.subscribe_infallible(pattern, handler)
}

/// [`Broker::drain`] on the default broker.
///
/// # Errors
/// As [`Broker::drain`]; [`DrainError::NotInitialized`] before [`init`].
pub fn drain(timeout: Duration) -> Result<(), DrainError> {
    DEFAULT.get().ok_or(DrainError::NotInitialized)?.drain(timeout)
}

/// [`Broker::shutdown`] on the default broker. The broker stays the default: later calls get
/// `Closed` errors, and `init` still reports it as initialized.
///
/// ```
/// use std::time::Duration;
///
/// eventbroker::init_builder(eventbroker::Broker::builder().workers(1))?;
/// let report = eventbroker::shutdown(Duration::from_secs(5))?;
/// assert!(report.is_clean());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`NotInitialized`] before [`init`].
pub fn shutdown(timeout: Duration) -> Result<ShutdownReport, NotInitialized> {
    Ok(DEFAULT.get().ok_or(NotInitialized)?.shutdown(timeout))
}
