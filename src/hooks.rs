//! CRUD hooks (the seed's `RegisterCRUDHooks`): publish `schema.entity.create|update|delete|read`
//! events from an application's data layer, without ever slowing it down or failing it.
//!
//! Call [`CrudHooks::after_create`] (and its siblings) after the operation succeeded, from the
//! request handler or repository that performed it. Each call builds the event (type
//! `schema.entity.operation`, source `database` unless [`CrudHookConfig::source`] says otherwise,
//! the user's id and session, metadata `user_name`, `user_email`, `user_roles` and `table_name`)
//! and queues it with [`Broker::try_publish`]. The schema is part of the type:
//! `public.users.create` is matched by `public.users.*`, `*.users.*` or `public.>`, never by
//! `users.*`. A schema or entity holding a `.` would add a segment to the type, so it is refused
//! ([`HookOutcome::Invalid`]).
//!
//! - **It never blocks**: whatever the broker's backpressure policy or mode (hooks always publish
//!   asynchronously), a full broker refuses the event at once.
//! - **It never fails the caller**: the outcome is returned as a [`HookOutcome`] for those who care,
//!   counted in [`CrudHooks::stats`], and logged (`warn`, at the 1st, 2nd, 4th, 8th … refusal, so
//!   a flood does not flood the log). An event refused is lost; use
//!   [`Broker::publish_confirmed`] directly where that is not acceptable.
//! - Reads are off by default ([`CrudHookConfig::read`]): they are the bulk of the traffic.
//! - **One table's events are handled in the order the hooks published them**: their partition
//!   key is `schema.entity`, so a record's `create`, `update` and `delete` go to one shard and
//!   are handled one after another, where the default key (the type) would put each operation
//!   on its own shard and let a record's `delete` be handled before its `create`. Tables spread
//!   over the shards; a single very busy table is handled by one worker.
//!
//! ```
//! use std::time::Duration;
//! use eventbroker::Broker;
//! use eventbroker::hooks::{CrudHookConfig, CrudHooks, HookOutcome, UserContext};
//!
//! let broker = Broker::builder().build()?;
//! broker.subscribe_infallible("public.users.*", |event| println!("{}", event.event_type))?;
//! let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
//! let user = UserContext::new(42).with_session_id("s-1").with_user_name("ada");
//! let outcome = hooks.after_create(&user, "public", "users", &serde_json::json!({"id": 7, "name": "Bob"}));
//! let HookOutcome::Published(id) = outcome else { panic!("not published: {outcome:?}") };
//! assert_eq!(hooks.after_read(&user, "public", "users", &[7]), HookOutcome::Disabled);
//!
//! // The event's status, once handled, by the id the hook returned.
//! broker.drain(Duration::from_secs(5))?;
//! assert_eq!(broker.provider().get(id)?.unwrap().event_type, "public.users.create");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::error::PublishError;
use crate::{Broker, Event, EventId, EventSource};

/// Which operations [`CrudHooks`] publish.
///
/// ```
/// use eventbroker::hooks::CrudHookConfig;
///
/// let config = CrudHookConfig { read: true, ..CrudHookConfig::default() };
/// assert!(config.create && config.update && config.delete && config.read);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools, reason = "one switch per operation, as the seed's config")]
pub struct CrudHookConfig {
    /// Publish `schema.entity.create`. Default `true`.
    pub create: bool,
    /// Publish `schema.entity.update`. Default `true`.
    pub update: bool,
    /// Publish `schema.entity.delete`. Default `true`.
    pub delete: bool,
    /// Publish `schema.entity.read`. Default `false`: reads are high volume.
    pub read: bool,
    /// The events' source. Default [`EventSource::Database`].
    pub source: EventSource,
}

impl Default for CrudHookConfig {
    fn default() -> Self {
        Self { create: true, update: true, delete: true, read: false, source: EventSource::Database }
    }
}

/// Who performed an operation: what the events carry about the user.
///
/// ```
/// use eventbroker::hooks::UserContext;
///
/// let user = UserContext::new(42)
///     .with_session_id("session-456")
///     .with_user_name("ada")
///     .with_email("ada@example.com")
///     .with_roles(["admin", "billing"]);
/// assert_eq!(user.roles.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserContext {
    /// The user's id (`user_id`); 0 when anonymous.
    pub user_id: i64,
    /// The session (`session_id`).
    pub session_id: String,
    /// Metadata `user_name`, when not empty.
    pub user_name: String,
    /// Metadata `user_email`, when not empty.
    pub email: String,
    /// Metadata `user_roles`, when not empty.
    pub roles: Vec<String>,
}

impl UserContext {
    /// The context of user `user_id`.
    pub fn new(user_id: i64) -> Self {
        Self { user_id, ..Self::default() }
    }

    /// Sets the session id.
    #[must_use]
    pub fn with_session_id(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = session_id.into();
        self
    }

    /// Sets the user name.
    #[must_use]
    pub fn with_user_name(mut self, name: impl Into<String>) -> Self {
        self.user_name = name.into();
        self
    }

    /// Sets the e-mail address.
    #[must_use]
    pub fn with_email(mut self, email: impl Into<String>) -> Self {
        self.email = email.into();
        self
    }

    /// Sets the roles.
    #[must_use]
    pub fn with_roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.roles = roles.into_iter().map(Into::into).collect();
        self
    }
}

/// What became of one hook call's event. The caller's operation is unaffected either way.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::Broker;
/// use eventbroker::hooks::{CrudHookConfig, CrudHooks, HookOutcome, UserContext};
///
/// let broker = Broker::builder().build()?;
/// let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
/// let _ = broker.shutdown(Duration::from_secs(5));
/// assert_eq!(hooks.after_delete(&UserContext::new(1), "public", "users", &7), HookOutcome::Closed);
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookOutcome {
    /// Queued for the subscribers, as the event with this id: what its status is looked up by.
    Published(EventId),
    /// The operation is switched off in the [`CrudHookConfig`].
    Disabled,
    /// Refused: the broker was full. Counted and logged; the event is lost.
    Full,
    /// Refused: the broker is shut down.
    Closed,
    /// Not built: the record did not serialize, or nests deeper than [`Event::MAX_JSON_DEPTH`],
    /// or holds an object that `serde_json`'s `Value` reads as another value (see
    /// [`Payload`](crate::Payload)), or `schema.entity.operation` is not a valid event type, or
    /// the schema or entity holds a `.` (which would shift the type's segments: `public.a.b.create`
    /// is matched by no `public.*.create`). Counted and logged.
    Invalid,
}

/// What [`CrudHooks`] did, per outcome.
///
/// ```
/// use eventbroker::Broker;
/// use eventbroker::hooks::{CrudHookConfig, CrudHooks, UserContext};
///
/// let broker = Broker::builder().build()?;
/// let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
/// hooks.after_read(&UserContext::new(1), "public", "users", &[1, 2, 3]);
/// assert_eq!(hooks.stats().disabled, 1); // reads are off by default
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CrudHookStats {
    /// Events queued.
    pub published: u64,
    /// Calls for operations switched off.
    pub disabled: u64,
    /// Events refused because the broker was full.
    pub full: u64,
    /// Events refused because the broker was shut down.
    pub closed: u64,
    /// Events not built (a record that did not serialize, an invalid type, a schema or entity
    /// holding a `.`).
    pub invalid: u64,
}

/// Publishes CRUD events for an application; share it (`Arc` it, or keep it in the application
/// state). See the [module docs](self).
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::Broker;
/// use eventbroker::hooks::{CrudHookConfig, CrudHooks, UserContext};
///
/// let broker = Broker::builder().build()?;
/// let hooks = Arc::new(CrudHooks::new(&broker, CrudHookConfig { read: true, ..CrudHookConfig::default() }));
/// let handler_hooks = Arc::clone(&hooks);
/// let delete_user = move |id: u64| {
///     // ... the DELETE succeeded ...
///     handler_hooks.after_delete(&UserContext::new(42), "public", "users", &id);
/// };
/// delete_user(7);
/// assert_eq!(hooks.stats().published, 1);
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug)]
pub struct CrudHooks {
    broker: Broker,
    config: CrudHookConfig,
    /// Relaxed counters: statistics.
    published: AtomicU64,
    disabled: AtomicU64,
    full: AtomicU64,
    closed: AtomicU64,
    invalid: AtomicU64,
}

/// `schema.entity`, inline up to 24 bytes: no allocation of its own for most tables.
fn partition_key(schema: &str, entity: &str) -> compact_str::CompactString {
    let mut key = compact_str::CompactString::with_capacity(schema.len() + 1 + entity.len());
    key.push_str(schema);
    key.push('.');
    key.push_str(entity);
    key
}

impl CrudHooks {
    /// Hooks publishing to `broker`.
    pub fn new(broker: &Broker, config: CrudHookConfig) -> Self {
        Self {
            broker: broker.clone(),
            config,
            published: AtomicU64::new(0),
            disabled: AtomicU64::new(0),
            full: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
        }
    }

    /// The settings.
    pub fn config(&self) -> CrudHookConfig {
        self.config
    }

    /// A record was created: publishes `schema.entity.create` with the record as payload.
    pub fn after_create<T: Serialize + ?Sized>(
        &self,
        user: &UserContext,
        schema: &str,
        entity: &str,
        record: &T,
    ) -> HookOutcome {
        self.emit(self.config.create, user, schema, entity, "create", || serde_json::to_value(record))
    }

    /// A record was updated: publishes `schema.entity.update` with `{"id": id, "data": data}`.
    ///
    /// ```
    /// use eventbroker::Broker;
    /// use eventbroker::hooks::{CrudHookConfig, CrudHooks, UserContext};
    ///
    /// let broker = Broker::builder().build()?;
    /// let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
    /// hooks.after_update(&UserContext::new(1), "public", "users", &7, &serde_json::json!({"name": "Eve"}));
    /// assert_eq!(hooks.stats().published, 1);
    /// # Ok::<(), eventbroker::BuildError>(())
    /// ```
    pub fn after_update<I, T>(
        &self,
        user: &UserContext,
        schema: &str,
        entity: &str,
        id: &I,
        data: &T,
    ) -> HookOutcome
    where
        I: Serialize + ?Sized,
        T: Serialize + ?Sized,
    {
        self.emit(self.config.update, user, schema, entity, "update", || {
            Ok(serde_json::json!({ "id": serde_json::to_value(id)?, "data": serde_json::to_value(data)? }))
        })
    }

    /// A record was deleted: publishes `schema.entity.delete` with `{"id": id}`.
    pub fn after_delete<I: Serialize + ?Sized>(
        &self,
        user: &UserContext,
        schema: &str,
        entity: &str,
        id: &I,
    ) -> HookOutcome {
        self.emit(self.config.delete, user, schema, entity, "delete", || {
            Ok(serde_json::json!({ "id": serde_json::to_value(id)? }))
        })
    }

    /// Records were read: publishes `schema.entity.read` with what was read as payload, when
    /// [`CrudHookConfig::read`] is on (it is off by default).
    pub fn after_read<T: Serialize + ?Sized>(
        &self,
        user: &UserContext,
        schema: &str,
        entity: &str,
        result: &T,
    ) -> HookOutcome {
        self.emit(self.config.read, user, schema, entity, "read", || serde_json::to_value(result))
    }

    /// Counts of every outcome so far.
    pub fn stats(&self) -> CrudHookStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CrudHookStats {
            published: load(&self.published),
            disabled: load(&self.disabled),
            full: load(&self.full),
            closed: load(&self.closed),
            invalid: load(&self.invalid),
        }
    }

    fn emit(
        &self,
        enabled: bool,
        user: &UserContext,
        schema: &str,
        entity: &str,
        operation: &str,
        payload: impl FnOnce() -> Result<serde_json::Value, serde_json::Error>,
    ) -> HookOutcome {
        if !enabled {
            self.disabled.fetch_add(1, Ordering::Relaxed);
            return HookOutcome::Disabled;
        }
        // Why there is no event: a name would shift the type's segments, or the record does not
        // serialize, or breaks a payload's rules.
        let names =
            match [("schema", schema), ("entity", entity)].into_iter().find(|(_, name)| name.contains('.')) {
                Some((what, name)) => {
                    Err(format!("the {what} {name:?} holds a '.', which would add a segment to the type"))
                }
                None => Ok(()),
            };
        let event = names.and_then(|()| payload().map_err(|error| error.to_string())).and_then(|payload| {
            let event = self.event(user, schema, entity, operation);
            event.try_with_payload_value(&payload).map_err(|refusal| refusal.to_string())
        });
        let event = match event {
            Ok(event) => event,
            Err(reason) => {
                let n = self.invalid.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%reason, schema, entity, operation, refused = n, "a CRUD hook's record is no payload; no event");
                }
                return HookOutcome::Invalid;
            }
        };
        let id = event.id;
        match self.broker.try_publish(event) {
            Ok(()) => {
                self.published.fetch_add(1, Ordering::Relaxed);
                HookOutcome::Published(id)
            }
            Err(error) => self.refused(&error),
        }
    }

    fn event(&self, user: &UserContext, schema: &str, entity: &str, operation: &str) -> Event {
        let mut event = Event::for_entity(self.config.source, schema, entity, operation)
            .with_partition_key(partition_key(schema, entity))
            .with_user_id(user.user_id)
            .with_session_id(user.session_id.clone())
            .with_metadata("table_name", entity);
        if !user.user_name.is_empty() {
            event = event.with_metadata("user_name", user.user_name.clone());
        }
        if !user.email.is_empty() {
            event = event.with_metadata("user_email", user.email.clone());
        }
        if !user.roles.is_empty() {
            event = event.with_metadata("user_roles", user.roles.clone());
        }
        event
    }

    fn refused(&self, error: &PublishError) -> HookOutcome {
        let (counter, outcome) = match error {
            PublishError::Full(_) => (&self.full, HookOutcome::Full),
            PublishError::InvalidType { .. } | PublishError::InvalidMetadata { .. } => {
                (&self.invalid, HookOutcome::Invalid)
            }
            _ => (&self.closed, HookOutcome::Closed),
        };
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            let event = error.event();
            tracing::warn!(%error, event_type = %event.event_type, refused = n, "a CRUD hook's event was not published; the operation goes on");
        }
        outcome
    }
}
