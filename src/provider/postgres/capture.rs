//! CRUD capture: a row trigger that turns every `INSERT`, `UPDATE` and `DELETE` on a table, by any
//! client, into an event in the same transaction.
//!
//! The trigger function (`<schema>.<table>_capture`, one per provider configuration) inserts an
//! event with source `database`, type `<schema>.<table>.create|update|delete`, `schema`, `entity`
//! and `operation` set, status `pending`, a UUID v7 id, `created_at` from the clock (microsecond
//! precision), the partition key `<schema>.<table>` (so a receiving broker handles one table's
//! changes in the order they were made, as it does the CRUD hooks' events) and no origin, so every
//! consumer group receives it. The payload is the row as JSON (`row_to_json`): the new row for
//! `create`, the old row for `delete`, and `{"old":…,"new":…}` for `update`, as compact as
//! `row_to_json` writes a row (where `json_build_object` would put spaces around its colons). It
//! then sends one wake-up on the channel, which PostgreSQL folds to one per transaction however
//! many rows change. The event is stored if and only if the change commits.
//!
//! ## Locks
//! Creating or dropping a trigger locks the table against every writer, and while that lock waits
//! for a writer's open transaction, every later writer queues behind it. So installing again
//! (what each start of a service does) leaves a trigger that is already in place, exactly as it
//! would create it, alone, and replaces only the function; and a change to the table's triggers
//! waits [`TABLE_LOCK_WAIT`] (1 s) at most for the lock, then fails as transient
//! ([`Unavailable`](crate::ProviderErrorKind::Unavailable)), to be tried again. Installs and
//! removals of one provider's capture take turns (an advisory lock), as PostgreSQL fails
//! concurrent replacements of one function.
//!
//! ## What capture follows
//! The trigger belongs to the table (its OID), not to its name, and names its events after the
//! table it was installed on (its arguments; on a partitioned table, the partitions' copies name
//! the parent). So:
//! - **Renamed** (`ALTER TABLE … RENAME`, `SET SCHEMA`): changes are still captured, as events
//!   named after the old name, until [`install`] under the new name re-creates the trigger with it.
//!   Subscribers' patterns name tables, so the name changes only when asked. [`status`] of the old
//!   name says [`CaptureStatus::Renamed`], with the new one; [`remove`] of the old name removes it.
//! - **Dropped and created again** (a migration): the trigger goes with the old table, and changes
//!   to the new one are not captured until [`install`] runs again. PostgreSQL tells no one (only an
//!   event trigger would, which needs a superuser): [`status`] says
//!   [`CaptureStatus::NotInstalled`], or [`CaptureStatus::NoTable`] while it is gone.
//! - **Disabled, or changed** (`ALTER TABLE … DISABLE TRIGGER`, a trigger replaced by hand):
//!   [`status`] says [`CaptureStatus::Altered`]; [`install`] puts it back.
//!
//! Calling [`install`] at every start of a service puts capture back after each; checking
//! [`status`] (one catalog query, no lock) finds a table whose capture was lost in between.

use super::backend::Backend;
use super::ident::{IdentError, QualifiedTable};
use super::schema::Names;
use super::{NAME, Shared};
use crate::error::{ProviderError, ProviderErrorKind};

/// Most a change to a captured table's triggers waits for the table's lock (see the module docs).
const TABLE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// `pg_trigger.tgtype` of `AFTER INSERT OR UPDATE OR DELETE … FOR EACH ROW`: the row, insert,
/// delete and update bits (1, 4, 8, 16), neither `BEFORE` (2) nor `INSTEAD OF` (64).
const CAPTURE_TRIGGER_TYPE: i16 = 1 | 4 | 8 | 16;

/// Whether a trigger (`t`) is what installing creates on a table named by `$3` (type bits) and `$4`
/// (arguments): row-level, after every insert, update and delete, enabled, with no condition,
/// column list or transition table.
const AS_INSTALLED: &str = "t.tgtype = $3 AND t.tgenabled = 'O' AND t.tgqual IS NULL \
     AND cardinality(t.tgattr::int2[]) = 0 AND t.tgconstraint = 0 AND t.tgoldtable IS NULL \
     AND t.tgnewtable IS NULL AND t.tgargs = $4";

/// What [`PostgresProvider::crud_capture_status`](super::PostgresProvider::crud_capture_status)
/// found of the capture of a table, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureStatus {
    /// The trigger is on the table of this name, as installing makes it: every change is captured.
    Capturing,
    /// The table of this name carries no capture trigger of this provider: it was never installed,
    /// or was removed, or the table was dropped and created again (a migration), which dropped the
    /// trigger with it. Changes are not captured; install again.
    NotInstalled,
    /// A capture trigger of this provider is on the table, but not as installing under this name
    /// makes it: disabled, changed by hand, or installed under the name the table had before a
    /// rename. Install again to make it so.
    Altered,
    /// No table has this name, and no table renamed from it carries its capture: a table captured
    /// under it was dropped.
    NoTable,
    /// The table captured under this name was renamed, or moved to another schema, and is now
    /// `now` (`schema.table`): its changes are still captured, as events named after this name,
    /// until capture is installed under `now`.
    Renamed {
        /// The table's name now, `schema.table`.
        now: String,
    },
}

/// A UUID v7 from SQL: 48 bits of Unix milliseconds over a random v4 UUID, version bits set to 7.
const UUID_V7: &str = "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) \
     placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) \
     FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid";

/// The trigger function's definition.
fn function_sql(names: &Names) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
             -- The writes to the events table are the provider's, whoever changed the captured row.
             SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $capture$
         DECLARE
             -- The table the trigger was installed on (its arguments), not a partition of it.
             sch text := coalesce(TG_ARGV[0], TG_TABLE_SCHEMA);
             tbl text := coalesce(TG_ARGV[1], TG_TABLE_NAME);
             op text := CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'update' ELSE 'delete' END;
             body json := CASE TG_OP
                 WHEN 'INSERT' THEN row_to_json(NEW)
                 WHEN 'UPDATE' THEN ('{{\"old\":' || row_to_json(OLD)::text || ',\"new\":' || row_to_json(NEW)::text || '}}')::json
                 ELSE row_to_json(OLD)
             END;
         BEGIN
             -- Partitioned by table, as the CRUD hooks' events are: a row's changes are handled
             -- in the order they were made.
             INSERT INTO {events} (id, source, \"type\", status, payload, \"schema\", entity, operation,
                                   created_at_ns, partition_key)
             VALUES ({UUID_V7}, 'database', sch || '.' || tbl || '.' || op, 'pending',
                     body, sch, tbl, op,
                     (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint, sch || '.' || tbl);
             PERFORM pg_notify('{channel}', '');
             RETURN NULL;
         END
         $capture$;
         -- Only as a trigger installed here: anyone else attaching it would write events.
         REVOKE EXECUTE ON FUNCTION {function}() FROM PUBLIC",
        function = names.capture_function(),
        events = names.events(),
        // A validated identifier: letters, digits and '_' only, so safe inside the literal.
        channel = names.channel.as_str(),
    )
}

fn target(names: &Names, table: &str, operation: &'static str) -> Result<QualifiedTable, ProviderError> {
    let target = QualifiedTable::parse(table).map_err(|e: IdentError| e.into_provider_error(operation))?;
    let own = ["", "_dead_letters", "_groups", "_claims", "_migrations"]
        .iter()
        .any(|suffix| target.table.as_str().strip_prefix(names.table.as_str()) == Some(suffix));
    if target.schema == names.schema && own {
        return Err(ProviderError::new(
            NAME,
            operation,
            ProviderErrorKind::InvalidInput(format!(
                "{target} is one of the provider's own tables; capturing it would capture its own events"
            )),
        ));
    }
    Ok(target)
}

/// Installs (or replaces) the capture trigger on `table`.
pub(super) fn install(shared: &Shared, table: &str) -> Result<(), ProviderError> {
    const OP: &str = "install_crud_capture";
    let names = &shared.backend.names;
    let target = target(names, table, OP)?;
    let function = function_sql(names);
    let trigger = format!(
        "CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {target}
         FOR EACH ROW EXECUTE FUNCTION {function}('{schema}', '{table}')",
        trigger = names.capture_trigger(),
        function = names.capture_function(),
        // Validated identifiers: letters, digits and '_' only, so safe inside the literals.
        schema = target.schema.as_str(),
        table = target.table.as_str(),
    );
    let backend = &shared.backend;
    let context = target.to_string();
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &context, err);
        let mut conn = backend.conn(OP).await?;
        let tx = conn.transaction().await.map_err(fail)?;
        take_turns(&tx, names).await.map_err(fail)?;
        tx.batch_execute(&function).await.map_err(fail)?;
        let current = names.capture_trigger();
        let installed = installed_triggers(&tx, names, &target, false).await.map_err(fail)?;
        let in_place = matches!(&installed[..], [only] if only.name == current.as_str() && only.intact);
        if !in_place {
            tx.batch_execute(&lock_wait_sql()).await.map_err(fail)?;
            // One trigger of this provider's per table: one installed under an earlier name would
            // capture every change a second time.
            for trigger in installed.iter().filter(|t| t.name != current.as_str()) {
                tx.batch_execute(&drop_trigger_sql(&trigger.name, &trigger.table)).await.map_err(fail)?;
            }
            tx.batch_execute(&trigger).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        conn.release();
        Ok(())
    })
}

/// Waits, within the statement timeout, for any other install or removal of this provider's
/// capture to end: instances starting together each install it, and PostgreSQL fails concurrent
/// replacements of one function ("tuple concurrently updated", or a unique violation when they
/// create it) instead of making one wait for the other. The lock ends with the transaction.
async fn take_turns(
    tx: &tokio_postgres::Transaction<'_>,
    names: &Names,
) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&names.capture_lock_key()]).await.map(drop)
}

/// `SET LOCAL lock_timeout` to [`TABLE_LOCK_WAIT`], for the statements that lock the table.
fn lock_wait_sql() -> String {
    format!("SET LOCAL lock_timeout = {}", TABLE_LOCK_WAIT.as_millis())
}

/// A trigger on a captured table that runs this provider's capture function.
struct Installed {
    /// Its name, as the catalog has it.
    name: String,
    /// The table it is on, quoted for SQL.
    table: String,
    /// Whether it is what installing creates: row-level, after every insert, update and delete,
    /// enabled, with no condition, column list or transition table, and the table's own schema
    /// and name as its arguments.
    intact: bool,
}

/// How `tgargs` holds the arguments a trigger capturing `target` is given: each followed by a NUL.
fn trigger_arguments(target: &QualifiedTable) -> Vec<u8> {
    format!("{}\0{}\0", target.schema.as_str(), target.table.as_str()).into_bytes()
}

/// The triggers on `target` that run this provider's capture function, whatever their names
/// (earlier versions named them after the provider's table); with `renamed_too`, also those
/// capturing under `target`'s name on a table since renamed (not the partitions' copies, which
/// go with their parent's).
async fn installed_triggers(
    tx: &tokio_postgres::Transaction<'_>,
    names: &Names,
    target: &QualifiedTable,
    renamed_too: bool,
) -> Result<Vec<Installed>, tokio_postgres::Error> {
    let rows = tx
        .query(
            &format!(
                "SELECT t.tgname::text, format('%I.%I', n.nspname, c.relname), {AS_INSTALLED}
                 FROM pg_trigger t
                 JOIN pg_class c ON c.oid = t.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE t.tgfoid = to_regprocedure($2) AND NOT t.tgisinternal
                   AND (t.tgrelid = to_regclass($1) OR ($5 AND t.tgparentid = 0 AND t.tgargs = $4))"
            ),
            &[
                &target.to_string(),
                &format!("{}()", names.capture_function()),
                &CAPTURE_TRIGGER_TYPE,
                &trigger_arguments(target),
                &renamed_too,
            ],
        )
        .await?;
    rows.iter()
        .map(|row| Ok(Installed { name: row.try_get(0)?, table: row.try_get(1)?, intact: row.try_get(2)? }))
        .collect()
}

/// `DROP TRIGGER` of a trigger named as the catalog has it, on `on` (quoted).
fn drop_trigger_sql(name: &str, on: &str) -> String {
    format!("DROP TRIGGER IF EXISTS \"{}\" ON {on}", name.replace('"', "\"\""))
}

/// Removes the capture trigger from `table`, and from a table renamed from it that still captures
/// under its name; `true` when there was one.
pub(super) fn remove(shared: &Shared, table: &str) -> Result<bool, ProviderError> {
    const OP: &str = "remove_crud_capture";
    let names = &shared.backend.names;
    let target = target(names, table, OP)?;
    let backend = &shared.backend;
    let context = target.to_string();
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &context, err);
        let mut conn = backend.conn(OP).await?;
        let tx = conn.transaction().await.map_err(fail)?;
        take_turns(&tx, names).await.map_err(fail)?;
        let installed = installed_triggers(&tx, names, &target, true).await.map_err(fail)?;
        if !installed.is_empty() {
            tx.batch_execute(&lock_wait_sql()).await.map_err(fail)?;
        }
        for trigger in &installed {
            tx.batch_execute(&drop_trigger_sql(&trigger.name, &trigger.table)).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        conn.release();
        Ok(!installed.is_empty())
    })
}

/// What capture under `table`'s name is now (see [`CaptureStatus`]): one catalog query, no lock.
pub(super) fn status(shared: &Shared, table: &str) -> Result<CaptureStatus, ProviderError> {
    const OP: &str = "crud_capture_status";
    let names = &shared.backend.names;
    let target = target(names, table, OP)?;
    let backend = &shared.backend;
    let context = target.to_string();
    let statement = format!(
        "SELECT to_regclass($1) IS NOT NULL,
                ARRAY(SELECT {AS_INSTALLED} FROM pg_trigger t
                      WHERE t.tgrelid = to_regclass($1) AND t.tgfoid = to_regprocedure($2)
                        AND NOT t.tgisinternal),
                (SELECT n.nspname || '.' || c.relname
                 FROM pg_trigger t
                 JOIN pg_class c ON c.oid = t.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE t.tgfoid = to_regprocedure($2) AND t.tgparentid = 0 AND t.tgargs = $4
                   AND t.tgrelid IS DISTINCT FROM to_regclass($1)
                 ORDER BY 1 LIMIT 1)"
    );
    let function = format!("{}()", names.capture_function());
    let arguments = trigger_arguments(&target);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&context, &function, &CAPTURE_TRIGGER_TYPE, &arguments];
    let rows = backend.call(OP, backend.query(OP, &context, &statement, &params))?;
    let fail = |err| Backend::error(OP, &context, err);
    let row = rows.first().ok_or_else(|| {
        ProviderError::new(
            NAME,
            OP,
            ProviderErrorKind::Backend(format!("{context}: the status query returned no row")),
        )
    })?;
    let exists: bool = row.try_get(0).map_err(fail)?;
    let on_table: Vec<bool> = row.try_get(1).map_err(fail)?;
    let renamed_to: Option<String> = row.try_get(2).map_err(fail)?;
    Ok(match (on_table.contains(&true), on_table.is_empty(), renamed_to) {
        (true, _, _) => CaptureStatus::Capturing,
        (false, false, _) => CaptureStatus::Altered,
        (false, true, Some(now)) => CaptureStatus::Renamed { now },
        (false, true, None) if exists => CaptureStatus::NotInstalled,
        (false, true, None) => CaptureStatus::NoTable,
    })
}
