//! The transactional outbox: storing events inside the caller's own transaction.

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::codec::{self, INSERT_COLUMNS};
use super::config::PostgresConfig;
use super::schema::Names;
use super::{NAME, backend::Backend};
use crate::error::ProviderError;
use crate::event::Event;

/// Publishes events through the caller's own PostgreSQL transaction, so an event exists if and only
/// if that transaction commits: the classic transactional outbox, without the relay, as the events
/// table is what every broker's inbound source reads.
///
/// Events written here have no origin: every consumer group receives them, the publishing
/// instance's own included (its broker did not dispatch them locally). They become deliverable
/// when the transaction commits, and are never seen if it rolls back. The
/// [`tokio_postgres`] re-exported by this module is the version to use.
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
            insert: format!(
                "INSERT INTO {table} ({INSERT_COLUMNS})
                 SELECT id, NULL, source, \"type\", status, retry_count, error, payload::json, user_id,
                        session_id, instance_id, \"schema\", entity, operation, created_at_ns,
                        processed_at_ns, completed_at_ns, metadata::json, partition_key
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                             $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[],
                             $13::text[], $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], $18::text[])
                     AS e(id, source, \"type\", status, retry_count, error, payload, user_id, session_id,
                          instance_id, \"schema\", entity, operation, created_at_ns, processed_at_ns,
                          completed_at_ns, metadata, partition_key)
                 ON CONFLICT (id) DO NOTHING"
            ),
            notify: "SELECT pg_notify($1, currval(pg_get_serial_sequence($2, 'seq'))::text)".to_owned(),
            channel: names.channel.as_str().to_owned(),
            table,
        }
    }

    /// Stores `events` through `client` (a `Transaction`, or a `Client` for an implicit one),
    /// with one wake-up for the brokers that fires when the transaction commits. Ids already
    /// stored are left as they are.
    ///
    /// # Errors
    /// [`InvalidInput`](crate::ProviderErrorKind::InvalidInput) for an event whose timestamps do
    /// not fit a row (before 1677 or after 2262) or whose metadata does not serialize; otherwise
    /// the statement's error, as the provider reports it. The caller's transaction is then in an
    /// error state, and rolls back.
    pub async fn publish<C: GenericClient + Sync>(
        &self,
        client: &C,
        events: &[Event],
    ) -> Result<(), ProviderError> {
        const OP: &str = "outbox_publish";
        if events.is_empty() {
            return Ok(());
        }
        let columns = Columns::of(events)?;
        let c = &columns;
        let fail = |err| Backend::error(OP, &self.table, err);
        client
            .execute(
                &self.insert,
                &[
                    &c.ids,
                    &c.sources,
                    &c.types,
                    &c.statuses,
                    &c.retries,
                    &c.errors,
                    &c.payloads,
                    &c.users,
                    &c.sessions,
                    &c.instances,
                    &c.schemas,
                    &c.entities,
                    &c.operations,
                    &c.created,
                    &c.processed,
                    &c.completed,
                    &c.metadata,
                    &c.partition_keys,
                ],
            )
            .await
            .map_err(fail)?;
        client.execute(&self.notify, &[&self.channel, &self.table]).await.map_err(fail)?;
        tracing::trace!(count = events.len(), table = %self.table, "{NAME} provider: outbox stored events");
        Ok(())
    }
}

/// Events as one array per column, to bind.
struct Columns<'a> {
    ids: Vec<Uuid>,
    sources: Vec<&'static str>,
    types: Vec<&'a str>,
    statuses: Vec<&'static str>,
    retries: Vec<i64>,
    errors: Vec<&'a str>,
    payloads: Vec<Option<&'a str>>,
    users: Vec<i64>,
    sessions: Vec<&'a str>,
    instances: Vec<&'a str>,
    schemas: Vec<&'a str>,
    entities: Vec<&'a str>,
    operations: Vec<&'a str>,
    created: Vec<i64>,
    processed: Vec<Option<i64>>,
    completed: Vec<Option<i64>>,
    metadata: Vec<String>,
    partition_keys: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn of(events: &'a [Event]) -> Result<Self, ProviderError> {
        const OP: &str = "outbox_publish";
        let mut c = Columns {
            ids: Vec::with_capacity(events.len()),
            sources: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            statuses: Vec::with_capacity(events.len()),
            retries: Vec::with_capacity(events.len()),
            errors: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            users: Vec::with_capacity(events.len()),
            sessions: Vec::with_capacity(events.len()),
            instances: Vec::with_capacity(events.len()),
            schemas: Vec::with_capacity(events.len()),
            entities: Vec::with_capacity(events.len()),
            operations: Vec::with_capacity(events.len()),
            created: Vec::with_capacity(events.len()),
            processed: Vec::with_capacity(events.len()),
            completed: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
            partition_keys: Vec::with_capacity(events.len()),
        };
        for event in events {
            let nanos =
                |at: Option<jiff::Timestamp>, field| at.map(|at| codec::to_nanos(at, field, OP)).transpose();
            c.ids.push(*event.id.as_uuid());
            c.sources.push(event.source.as_str());
            c.types.push(&event.event_type);
            c.statuses.push(event.status.as_str());
            c.retries.push(i64::from(event.retry_count));
            c.errors.push(&event.error);
            c.payloads.push(event.payload_json());
            c.users.push(event.user_id);
            c.sessions.push(&event.session_id);
            c.instances.push(&event.instance_id);
            c.schemas.push(&event.schema);
            c.entities.push(&event.entity);
            c.operations.push(&event.operation);
            c.created.push(codec::to_nanos(event.created_at, "created_at", OP)?);
            c.processed.push(nanos(event.processed_at, "processed_at")?);
            c.completed.push(nanos(event.completed_at, "completed_at")?);
            c.metadata.push(codec::metadata_json(event, OP)?);
            c.partition_keys.push(event.partition_key.as_deref());
        }
        Ok(c)
    }
}
