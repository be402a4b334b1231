//! CRUD capture: a row trigger that turns every `INSERT`, `UPDATE` and `DELETE` on a table, by any
//! client, into an event in the same transaction.
//!
//! The trigger function (`<schema>.<table>_capture`, one per provider configuration) inserts an
//! event with source `database`, type `<schema>.<table>.create|update|delete`, `schema`, `entity`
//! and `operation` set, status `pending`, a UUID v7 id, `created_at` from the clock (microsecond
//! precision) and no origin, so every consumer group receives it. The payload is the row as JSON
//! (`row_to_json`): the new row for `create`, the old row for `delete`, and
//! `{"old":…,"new":…}` for `update`, as compact as `row_to_json` writes a row (where
//! `json_build_object` would put spaces around its colons). It then sends one wake-up on the
//! channel, which PostgreSQL folds to one per transaction however many rows change. The event is
//! stored if and only if the change commits.

use super::backend::Backend;
use super::ident::{IdentError, QualifiedTable};
use super::schema::Names;
use super::{NAME, Shared};
use crate::error::{ProviderError, ProviderErrorKind};

/// A UUID v7 from SQL: 48 bits of Unix milliseconds over a random v4 UUID, version bits set to 7.
const UUID_V7: &str = "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) \
     placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) \
     FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid";

/// The trigger function's definition.
fn function_sql(names: &Names) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $capture$
         DECLARE
             op text := CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'update' ELSE 'delete' END;
             body json := CASE TG_OP
                 WHEN 'INSERT' THEN row_to_json(NEW)
                 WHEN 'UPDATE' THEN ('{{\"old\":' || row_to_json(OLD)::text || ',\"new\":' || row_to_json(NEW)::text || '}}')::json
                 ELSE row_to_json(OLD)
             END;
         BEGIN
             INSERT INTO {events} (id, source, \"type\", status, payload, \"schema\", entity, operation, created_at_ns)
             VALUES ({UUID_V7}, 'database', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME || '.' || op, 'pending',
                     body, TG_TABLE_SCHEMA, TG_TABLE_NAME, op,
                     (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint);
             PERFORM pg_notify('{channel}', '');
             RETURN NULL;
         END
         $capture$",
        function = names.capture_function(),
        events = names.events(),
        // A validated identifier: letters, digits and '_' only, so safe inside the literal.
        channel = names.channel.as_str(),
    )
}

fn target(names: &Names, table: &str, operation: &'static str) -> Result<QualifiedTable, ProviderError> {
    let target = QualifiedTable::parse(table).map_err(|e: IdentError| e.into_provider_error(operation))?;
    if target.schema == names.schema && target.table.as_str().starts_with(names.table.as_str()) {
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
         FOR EACH ROW EXECUTE FUNCTION {function}()",
        trigger = names.capture_trigger(),
        function = names.capture_function(),
    );
    let backend = &shared.backend;
    let context = target.to_string();
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &context, err);
        let mut conn = backend.conn(OP).await?;
        let tx = conn.transaction().await.map_err(fail)?;
        tx.batch_execute(&function).await.map_err(fail)?;
        tx.batch_execute(&trigger).await.map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        conn.release();
        Ok(())
    })
}

/// Removes the capture trigger from `table`; `true` when it was installed.
pub(super) fn remove(shared: &Shared, table: &str) -> Result<bool, ProviderError> {
    const OP: &str = "remove_crud_capture";
    let names = &shared.backend.names;
    let target = target(names, table, OP)?;
    let trigger_name = names.capture_trigger();
    let drop_trigger = format!("DROP TRIGGER IF EXISTS {trigger_name} ON {target}");
    let backend = &shared.backend;
    let context = target.to_string();
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &context, err);
        let mut conn = backend.conn(OP).await?;
        let tx = conn.transaction().await.map_err(fail)?;
        let installed: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger t
                     JOIN pg_class c ON c.oid = t.tgrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE t.tgname = $1 AND c.relname = $2 AND n.nspname = $3)",
                &[&trigger_name.as_str(), &target.table.as_str(), &target.schema.as_str()],
            )
            .await
            .map_err(fail)?
            .try_get(0)
            .map_err(fail)?;
        if installed {
            tx.batch_execute(&drop_trigger).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        conn.release();
        Ok(installed)
    })
}
