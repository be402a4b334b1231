//! Bringing the schema to the current version: each step of
//! [`Names::migrations_sql`](super::schema::Names::migrations_sql) not yet recorded in
//! `<table>_migrations` is applied, in one transaction under an advisory lock on the
//! schema, so providers connecting at once neither race nor apply a step twice.
//!
//! A schema already current is only read: PostgreSQL checks the right to create before it
//! looks whether the object exists, so even `CREATE SCHEMA IF NOT EXISTS` fails for a role that
//! may only read and write the provider's tables (the usual split: migrations by an owner role,
//! the service by one with data rights). Such a role connects once the owner has migrated.
//!
//! Before anything else, the server's version is checked against [`MIN_SERVER_VERSION`]: an older
//! server fails the connection with an error naming both versions, instead of some later
//! statement failing on a function or syntax that server lacks.

use super::NAME;
use super::backend::Backend;
use crate::error::{ProviderError, ProviderErrorKind};

/// The oldest server the provider works with, as `server_version_num` writes it: 13 brought
/// `pg_current_xact_id` and `pg_snapshot` (what the inbound horizon reads), 14 `CREATE OR REPLACE
/// TRIGGER` (what CRUD capture installs with).
pub(super) const MIN_SERVER_VERSION: i32 = 14_00_00;

/// Refuses a server older than [`MIN_SERVER_VERSION`]; `number` and `version` are its
/// `server_version_num` and `server_version`.
fn check_server_version(number: i32, version: &str) -> Result<(), ProviderError> {
    if number >= MIN_SERVER_VERSION {
        return Ok(());
    }
    Err(ProviderError::new(
        NAME,
        "connect",
        ProviderErrorKind::Backend(format!(
            "the server runs PostgreSQL {version} (server_version_num {number}); this provider needs \
             PostgreSQL {} or later (server_version_num {MIN_SERVER_VERSION})",
            MIN_SERVER_VERSION / 10_000
        )),
    ))
}

pub(super) fn migrate(backend: &Backend) -> Result<(), ProviderError> {
    const OP: &str = "connect";
    let names = &backend.names;
    let (bootstrap, steps) = names.migrations_sql();
    let lock_key = names.migration_lock_key();
    let migrations = names.migrations_table();
    let record = format!("INSERT INTO {migrations} (version) VALUES ($1)");
    let read_applied = format!("SELECT version FROM {migrations}");
    let current = backend.call(OP, async {
        let fail = |err| Backend::error(OP, &migrations, err);
        let conn = backend.conn(OP).await?;
        let exists = conn
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL, current_setting('server_version_num')::int,
                        current_setting('server_version')",
                &[&migrations],
            )
            .await
            .map_err(fail)?;
        check_server_version(exists.try_get(1).map_err(fail)?, exists.try_get(2).map_err(fail)?)?;
        let applied: Option<Vec<i32>> = if exists.try_get(0).map_err(fail)? {
            // A role without the right to read it goes on to the steps, and fails there, saying
            // why.
            match conn.query(&read_applied, &[]).await {
                Ok(rows) => {
                    Some(rows.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>().map_err(fail)?)
                }
                Err(_) => None,
            }
        } else {
            None
        };
        conn.release();
        Ok(applied.is_some_and(|applied| steps.iter().all(|(version, _)| applied.contains(version))))
    })?;
    if current {
        return Ok(());
    }
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &migrations, err);
        let mut conn = backend.conn(OP).await?;
        let tx = conn.transaction().await.map_err(fail)?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock_key]).await.map_err(fail)?;
        tx.batch_execute(&bootstrap).await.map_err(fail)?;
        let applied: Vec<i32> = tx
            .query(&read_applied, &[])
            .await
            .map_err(fail)?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        for (version, step) in &steps {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(step).await.map_err(fail)?;
            tx.execute(&record, &[version]).await.map_err(fail)?;
            tracing::info!(version, table = %names.events(), "{NAME} provider: applied migration");
        }
        let known = steps.last().map_or(0, |(version, _)| *version);
        if let Some(newer) = applied.iter().find(|&&v| v > known) {
            tracing::warn!(
                version = newer,
                known,
                table = %names.events(),
                "{NAME} provider: the schema has a migration this version does not know; carrying on"
            );
        }
        tx.commit().await.map_err(fail)?;
        conn.release();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server older than 14 is refused with both versions named; 14 and later pass.
    #[test]
    fn a_server_older_than_14_is_refused_naming_both_versions() {
        for (number, version) in [(130_012, "13.12"), (120_000, "12.0"), (90_624, "9.6.24")] {
            let error = check_server_version(number, version).expect_err(version);
            assert!(matches!(error.kind(), ProviderErrorKind::Backend(_)), "{error}");
            assert!(!error.is_transient(), "{error}");
            let message = error.to_string();
            for needle in [version, "needs PostgreSQL 14 or later", &number.to_string(), "140000"] {
                assert!(message.contains(needle), "{needle:?} in {message}");
            }
        }
        for (number, version) in [(140_000, "14.0"), (150_020, "15.20"), (180_000, "18devel")] {
            check_server_version(number, version).expect(version);
        }
    }
}
