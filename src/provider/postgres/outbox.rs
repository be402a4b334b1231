//! The transactional outbox: storing events inside the caller's own transaction.

use tokio_postgres::GenericClient;

use super::codec::{self, EventColumns};
use super::config::PostgresConfig;
use super::schema::Names;
use super::{NAME, backend::Backend};
use crate::error::ProviderError;
use crate::event::Event;

const OP: &str = "outbox_publish";

/// Publishes events through the caller's own PostgreSQL transaction, so an event exists if and only
/// if that transaction commits: the classic transactional outbox, without the relay, as the events
/// table is what every broker's inbound source reads.
///
/// Events written here have no origin: every consumer group receives them, the publishing
/// instance's own included (its broker did not dispatch them locally). They become deliverable
/// when the transaction commits, and are never seen if it rolls back. The
/// [`tokio_postgres`] re-exported by this module is the version to use; `publish` is async, so a
/// synchronous application runs it on a Tokio runtime of its own, with the connection's task
/// spawned on it, as below.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use eventbroker::provider::postgres::{Outbox, PostgresConfig, tokio_postgres};
/// use eventbroker::{Event, EventSource};
///
/// let config = PostgresConfig::new("host=127.0.0.1 user=postgres dbname=app");
/// let outbox = Outbox::new(&config)?;
/// let (mut client, connection) = tokio_postgres::connect(&config.url, tokio_postgres::NoTls).await?;
/// tokio::spawn(connection);
///
/// let tx = client.transaction().await?;
/// tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&7_i64]).await?;
/// let event = Event::new(EventSource::Database, "billing.account.debited").with_user_id(7);
/// outbox.publish(&tx, &[event]).await?;
/// tx.commit().await?; // The event is delivered now; with a rollback it would never be.
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    insert: String,
    notify: String,
    table: String,
    channel: String,
}

impl Outbox {
    /// An outbox writing to the tables `config` names. It connects nothing: the tables must exist,
    /// which a [`PostgresProvider`](super::PostgresProvider) with the same names ensures.
    ///
    /// # Errors
    /// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput) for a name that is not a valid
    /// identifier.
    pub fn new(config: &PostgresConfig) -> Result<Self, ProviderError> {
        Ok(Self::from_names(&config.validate()?))
    }

    pub(super) fn from_names(names: &Names) -> Self {
        let table = names.events();
        Self {
            insert: codec::insert_from_arrays(&table, "NULL", "ON CONFLICT (id) DO NOTHING"),
            notify: codec::NOTIFY.to_owned(),
            channel: names.channel.as_str().to_owned(),
            table,
        }
    }

    /// Stores `events` through `client` (a `Transaction`, or a `Client` for an implicit one),
    /// with one wake-up for the brokers that fires when the transaction commits. Ids already
    /// stored are left as they are.
    ///
    /// # Errors
    /// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput), before anything is written, for
    /// an event a broker would refuse to publish (a type that is not a valid event type, metadata
    /// nested deeper than [`Event::MAX_JSON_DEPTH`]) or whose timestamps do not fit a row (before
    /// 1677 or after 2262); otherwise the statement's error, as the provider reports it. The
    /// caller's transaction is then in an error state, and rolls back.
    pub async fn publish<C: GenericClient + Sync>(
        &self,
        client: &C,
        events: &[Event],
    ) -> Result<(), ProviderError> {
        let Some(columns) = Self::columns(events)? else { return Ok(()) };
        let fail = |err| Backend::error(OP, &self.table, err);
        client.execute(&self.insert, &columns.params()).await.map_err(fail)?;
        client.execute(&self.notify, &[&self.channel, &self.table]).await.map_err(fail)?;
        self.published(events.len());
        Ok(())
    }

    /// [`Outbox::publish`] for a synchronous application: through the blocking
    /// [`postgres`](::postgres) client's `Transaction` (or `Client`), re-exported as
    /// [`postgres`](super::postgres). It blocks as that client's calls do, up to the
    /// connection's own timeouts (`statement_timeout`, the socket's).
    ///
    /// ```no_run
    /// # fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// use eventbroker::provider::postgres::{Outbox, PostgresConfig, postgres};
    /// use eventbroker::{Event, EventSource};
    ///
    /// let config = PostgresConfig::new("host=127.0.0.1 user=postgres dbname=app");
    /// let outbox = Outbox::new(&config)?;
    /// let mut client = postgres::Client::connect(&config.url, postgres::NoTls)?;
    ///
    /// let mut tx = client.transaction()?;
    /// tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&7_i64])?;
    /// let event = Event::new(EventSource::Database, "billing.account.debited").with_user_id(7);
    /// outbox.publish_blocking(&mut tx, &[event])?;
    /// tx.commit()?; // The event is delivered now; with a rollback it would never be.
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Outbox::publish`].
    pub fn publish_blocking<C: ::postgres::GenericClient>(
        &self,
        client: &mut C,
        events: &[Event],
    ) -> Result<(), ProviderError> {
        let Some(columns) = Self::columns(events)? else { return Ok(()) };
        let fail = |err| Backend::error(OP, &self.table, err);
        client.execute(&self.insert, &columns.params()).map_err(fail)?;
        client.execute(&self.notify, &[&self.channel, &self.table]).map_err(fail)?;
        self.published(events.len());
        Ok(())
    }

    /// The statement's columns of `events`, checked as a broker checks an event it publishes;
    /// `None` when there are none.
    fn columns(events: &[Event]) -> Result<Option<EventColumns<'_>>, ProviderError> {
        if events.is_empty() {
            return Ok(None);
        }
        for (index, event) in events.iter().enumerate() {
            // What a broker refuses at publish: written here, it would reach every broker only to
            // be dead-lettered there as invalid.
            let refusal = match crate::validate_event_type(&event.event_type) {
                Err(error) => Some(error.to_string()),
                Ok(()) => event
                    .too_deep_metadata()
                    .map(|key| format!("metadata {key:?} nests deeper than {}", Event::MAX_JSON_DEPTH)),
            };
            if let Some(reason) = refusal {
                return Err(ProviderError::new(
                    NAME,
                    OP,
                    crate::ProviderErrorKind::InvalidInput(format!("event {index} ({}): {reason}", event.id)),
                ));
            }
        }
        let events: Vec<&Event> = events.iter().collect();
        EventColumns::of(&events, OP).map(Some)
    }

    fn published(&self, count: usize) {
        tracing::trace!(count, table = %self.table, "{NAME} provider: outbox stored events");
    }
}
