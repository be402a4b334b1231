//! The tables, their names, and the versioned migration that creates them.
//!
//! Every name below derives from the configured schema and table (validated [`Ident`]s), so two
//! providers configured alike share one set of tables and two configured apart never meet:
//!
//! | table | holds |
//! |---|---|
//! | `<table>` | the events: the seed's columns, `seq` (the cursor), `tx` (the writing transaction), `origin` |
//! | `<table>_dead_letters` | dead letters, the event as JSON |
//! | `<table>_groups` | one row per consumer group: its cursor |
//! | `<table>_claims` | events handed to a group and not yet acknowledged |
//! | `<table>_migrations` | the migration versions applied |

use super::ident::Ident;

/// Bytes reserved after the table name for the longest suffix below (`_dead_letters`).
pub(super) const SUFFIX_RESERVE: usize = "_dead_letters".len();

/// The validated names of everything the provider creates or listens on.
#[derive(Debug, Clone)]
pub(super) struct Names {
    pub(super) schema: Ident,
    pub(super) table: Ident,
    pub(super) channel: Ident,
}

impl Names {
    /// `"schema"."table"`, the events table.
    pub(super) fn events(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    pub(super) fn dead_letters(&self) -> String {
        self.qualified("_dead_letters")
    }

    pub(super) fn groups(&self) -> String {
        self.qualified("_groups")
    }

    pub(super) fn claims(&self) -> String {
        self.qualified("_claims")
    }

    fn migrations(&self) -> String {
        self.qualified("_migrations")
    }

    /// The trigger function CRUD capture installs.
    pub(super) fn capture_function(&self) -> String {
        self.qualified("_capture")
    }

    /// The name of the capture trigger on a captured table: one per provider configuration, as
    /// providers in different schemas may have tables of one name capturing the same table.
    pub(super) fn capture_trigger(&self) -> Ident {
        let hash = stable_hash(&format!("{}.{}", self.schema.as_str(), self.table.as_str()));
        Ident::parse("trigger", &format!("eventbroker_capture_{hash:016x}"), 0).expect("a valid identifier")
    }

    /// `"schema"."table<suffix>"`.
    fn qualified(&self, suffix: &str) -> String {
        format!("{}.{}", self.schema, self.table.with_suffix(suffix))
    }

    /// The key of the advisory lock migrations of this schema take, as SQL text for `hashtext`.
    pub(super) fn migration_lock_key(&self) -> String {
        format!("eventbroker:{}", self.schema.as_str())
    }

    /// The key of the advisory lock that installing and removing this provider's CRUD capture
    /// take, as SQL text for `hashtext`: they replace one trigger function, which PostgreSQL
    /// refuses to do from two transactions at once.
    pub(super) fn capture_lock_key(&self) -> String {
        format!("eventbroker-capture:{}.{}", self.schema.as_str(), self.table.as_str())
    }

    /// Every migration step, in version order. A step is applied once, in one transaction with
    /// its version row; steps are never edited once released, only appended.
    pub(super) fn migrations_sql(&self) -> (String, Vec<(i32, String)>) {
        let bootstrap = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {migrations} (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
            schema = self.schema,
            migrations = self.migrations(),
        );
        (bootstrap, vec![(1, self.version_1()), (2, self.version_2())])
    }

    /// The current migration table name, for reading which versions are applied.
    pub(super) fn migrations_table(&self) -> String {
        self.migrations()
    }

    fn version_1(&self) -> String {
        let table = self.table.as_str();
        let index = |suffix: &str| self.table.with_suffix(suffix);
        format!(
            "CREATE TABLE {events} (
                 seq             bigserial PRIMARY KEY,
                 -- The transaction that stored the row, as a number: what makes delivery immune to
                 -- transactions committing out of seq order (see the provider's docs).
                 tx              bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
                 id              uuid NOT NULL,
                 -- The consumer group that published it; NULL for everything else.
                 origin          text,
                 source          text NOT NULL,
                 \"type\"          text NOT NULL,
                 status          text NOT NULL,
                 retry_count     bigint NOT NULL DEFAULT 0,
                 error           text NOT NULL DEFAULT '',
                 payload         json,
                 user_id         bigint NOT NULL DEFAULT 0,
                 session_id      text NOT NULL DEFAULT '',
                 instance_id     text NOT NULL DEFAULT '',
                 \"schema\"        text NOT NULL DEFAULT '',
                 entity          text NOT NULL DEFAULT '',
                 operation       text NOT NULL DEFAULT '',
                 -- Nanoseconds since the Unix epoch: timestamptz keeps microseconds only.
                 created_at_ns   bigint NOT NULL,
                 processed_at_ns bigint,
                 completed_at_ns bigint,
                 metadata        json NOT NULL DEFAULT '{{}}',
                 partition_key   text,
                 CONSTRAINT {id_key} UNIQUE (id)
             );
             CREATE INDEX {by_tx} ON {events} (tx, seq);
             CREATE INDEX {by_time} ON {events} (created_at_ns, id);
             CREATE INDEX {by_type} ON {events} (\"type\" text_pattern_ops);
             COMMENT ON TABLE {events} IS 'eventbroker events ({table}); created_at_ns and the other *_ns \
                 columns are nanoseconds since the Unix epoch: to_timestamp(created_at_ns / 1e9)';

             CREATE TABLE {dead_letters} (
                 id              uuid PRIMARY KEY,
                 event_id        uuid NOT NULL,
                 event_type      text NOT NULL,
                 -- The event in its JSON form, byte for byte as Event::to_json writes it.
                 event           json NOT NULL,
                 subscription_id bigint NOT NULL,
                 pattern         text NOT NULL,
                 error           text NOT NULL,
                 attempts        bigint NOT NULL,
                 failed_at_ns    bigint NOT NULL
             );
             CREATE INDEX {letters_by_time} ON {dead_letters} (failed_at_ns, id);

             CREATE TABLE {groups} (
                 group_key   text PRIMARY KEY,
                 -- Every event at or before (cursor_tx, cursor_seq) has been looked at.
                 cursor_tx   bigint NOT NULL,
                 cursor_seq  bigint NOT NULL,
                 -- The snapshot the group was created in: only events it did not see are new.
                 start_xmax  bigint NOT NULL,
                 start_xip   bigint[] NOT NULL,
                 created_at  timestamptz NOT NULL DEFAULT now()
             );

             CREATE TABLE {claims} (
                 group_key   text NOT NULL,
                 seq         bigint NOT NULL,
                 owner       text NOT NULL,
                 claimed_at  timestamptz NOT NULL,
                 -- Set by a nak, a departure or a restart: from then on any member may take it.
                 due_at      timestamptz,
                 deliveries  integer NOT NULL DEFAULT 1,
                 PRIMARY KEY (group_key, seq)
             );",
            events = self.events(),
            dead_letters = self.dead_letters(),
            groups = self.groups(),
            claims = self.claims(),
            id_key = index("_id_key"),
            by_tx = index("_tx_seq"),
            by_time = index("_created"),
            by_type = index("_type"),
            letters_by_time = index("_dl_failed"),
        )
    }

    /// Dead letters by event: what a redrive looks up to tell whether the event has any left.
    fn version_2(&self) -> String {
        format!(
            "CREATE INDEX {letters_by_event} ON {dead_letters} (event_id);",
            dead_letters = self.dead_letters(),
            letters_by_event = self.table.with_suffix("_dl_event"),
        )
    }
}

/// FNV-1a of `text`: stable across builds and versions, unlike the standard library's hasher, so
/// every instance derives the same name from it.
pub(super) fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
