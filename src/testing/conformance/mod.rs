//! The provider conformance suite: every scenario a provider must pass, as plain functions, and
//! [`conformance_suite!`](crate::conformance_suite), which turns the whole list into one `#[test]`
//! per scenario for a backend.
//!
//! - [`store`]: one provider handle: writes, queries, dead letters, replay, stats, closing.
//! - [`inbound`]: consumer groups on the provider itself: fan-out, work-queue, no echo, acks,
//!   redelivery after a nak, a claim or a restart, filters.
//! - [`cross`]: brokers sharing the backend: fan-out and work-queue end to end, a broker torn down
//!   with unacknowledged events, per-key order across instances, filters, fetch errors.
//!
//! A backend's test file runs it with a [`TestBackend`] that hands out handles onto one shared
//! backend namespace, the way separate processes would connect to one server:
//!
//! ```
//! use eventbroker::testing::conformance::MemoryBackend;
//!
//! eventbroker::conformance_suite!(memory, MemoryBackend::new);
//! ```
//!
//! Scenarios are written for a backend shared with other test runs: each one works under a fresh
//! random type prefix and group names ([`Scope`]), filters its inbound sources to that prefix, reads
//! back only its own events, and never assumes the store starts empty. Scenarios that check exact
//! deltas of backend-wide stats take [`EXCLUSIVE`] for writing, so no other scenario of the same
//! test binary writes meanwhile. What a backend cannot do (see [`Capabilities`](crate::Capabilities))
//! is checked to fail with `NotSupported` instead.
#![allow(clippy::missing_panics_doc, reason = "scenarios report a failure by panicking, as tests do")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::{
    ConsumerGroup, Event, EventFilter, EventId, EventSource, MemoryProvider, Pattern, Provider,
    ProviderError, ProviderErrorKind,
};

pub mod cross;
pub mod inbound;
pub mod store;

/// A backend under test: a namespace on it (a key prefix, a stream, a schema) that every handle
/// from [`connect`](Self::connect) shares, as separate processes would share one server. A fresh
/// one per test; dropping it removes what the test left behind.
pub trait TestBackend {
    /// A new handle onto the backend. For the memory provider, the one shared provider.
    fn connect(&self) -> Arc<dyn Provider>;
}

/// The memory provider as a [`TestBackend`]: every handle is the same provider, the in-process bus.
#[derive(Debug, Clone)]
pub struct MemoryBackend(Arc<MemoryProvider>);

impl MemoryBackend {
    /// A backend on a fresh memory provider with default settings.
    pub fn new() -> Self {
        Self(Arc::new(MemoryProvider::default()))
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBackend for MemoryBackend {
    fn connect(&self) -> Arc<dyn Provider> {
        self.0.clone()
    }
}

/// Expands to a module `$name` with one `#[test]` per scenario of the suite; `$backend` is called
/// once per test for a fresh [`TestBackend`].
///
/// ```
/// use eventbroker::testing::conformance::MemoryBackend;
///
/// eventbroker::conformance_suite!(memory, MemoryBackend::new);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $backend:expr) => {
        $crate::conformance_suite!(@each $name, $backend,
            store: [
                round_trip_keeps_every_field,
                get_unknown_id_is_none,
                empty_batches_are_no_ops,
                store_again_replaces_without_double_count,
                a_re_store_with_another_type_is_found_by_that_type,
                store_batch_of_1000,
                list_each_filter_alone_and_combined,
                list_order_limit_and_offset,
                list_time_window_is_half_open,
                status_updates_single_and_batch,
                status_update_for_unknown_id_is_skipped,
                delete_removes_everywhere,
                dead_letters_store_list_filter_get_delete,
                replay_from_beginning_sequence_and_time,
                replay_pages_with_a_pattern,
                stats_follow_every_change,
                flush_keeps_writes_visible,
                close_refuses_every_call,
            ],
            backend: [
                inbound::a_new_group_starts_at_the_end,
                inbound::fan_out_delivers_every_other_group_event_once_without_echo,
                inbound::work_queue_members_share_the_events,
                inbound::a_work_queue_group_never_receives_its_own_events,
                inbound::events_come_in_store_order,
                inbound::unacked_events_go_to_another_member_after_the_claim_idle_time,
                inbound::extend_keeps_an_event_from_being_claimed,
                inbound::a_nak_redelivers_after_its_delay,
                inbound::a_restarted_instance_resumes_where_it_left_off,
                inbound::a_deleted_group_starts_afresh,
                inbound::the_filter_keeps_unwanted_events_back,
                inbound::a_waiting_fetch_wakes_when_an_event_arrives,
                inbound::a_closed_source_refuses_every_call,
                cross::fan_out_each_broker_handles_every_event_once,
                cross::work_queue_each_event_is_handled_by_one_broker,
                cross::work_queue_members_share_a_burst,
                cross::a_broker_torn_down_loses_nothing_it_fetched,
                cross::per_key_order_holds_across_instances,
                cross::a_restarted_instance_receives_what_it_missed_for_each_handler,
                cross::an_unsettled_delivery_comes_back_to_the_restarted_instance,
                cross::a_member_holding_an_event_keeps_its_claim,
                cross::a_member_that_unsubscribes_gives_back_what_it_fetched,
                cross::events_nobody_wants_never_reach_the_handlers,
                cross::a_fetch_error_does_not_stop_local_dispatch,
            ],
        );
    };
    (@each $name:ident, $backend:expr, store: [$($store:ident),* $(,)?], backend: [$($module:ident :: $scenario:ident),* $(,)?] $(,)?) => {
        mod $name {
            $(
                #[test]
                fn $store() {
                    $crate::testing::conformance::run_store(
                        &($backend)(),
                        $crate::testing::conformance::store::$store,
                    );
                }
            )*
            $(
                #[test]
                fn $scenario() {
                    $crate::testing::conformance::$module::$scenario(&($backend)());
                }
            )*
        }
    };
}

/// Runs one single-provider scenario on a fresh handle, then closes it.
pub fn run_store(backend: &dyn TestBackend, scenario: fn(&dyn Provider)) {
    let provider = backend.connect();
    scenario(&*provider);
    provider.close().expect("close after a scenario");
}

/// Scenarios that check exact deltas of backend-wide stats hold this for writing; all others hold
/// it for reading.
pub static EXCLUSIVE: RwLock<()> = RwLock::new(());

/// A random prefix that keeps one scenario's events and groups apart from everything else.
#[derive(Debug)]
pub struct Scope {
    prefix: String,
}

impl Scope {
    /// A fresh scope.
    pub fn new() -> Self {
        Self { prefix: format!("ct{}", EventId::new().as_uuid().simple()) }
    }

    /// The type `<prefix>.<rest>`.
    pub fn ty(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    /// The pattern `<prefix>.<rest>`.
    ///
    /// # Panics
    /// If the result does not parse.
    pub fn pattern(&self, rest: &str) -> Pattern {
        Pattern::parse(&self.ty(rest)).expect("a valid pattern")
    }

    /// Every type of this scope.
    pub fn all(&self) -> Pattern {
        self.pattern(">")
    }

    /// A name for a group or an instance: `<prefix>-<rest>` (letters, digits and dashes only when
    /// `rest` is).
    pub fn name(&self, rest: &str) -> String {
        format!("{}-{rest}", self.prefix)
    }

    /// A fan-out group of instance `rest`.
    pub fn instance(&self, rest: &str) -> ConsumerGroup {
        ConsumerGroup::Instance(self.name(rest))
    }

    /// A filter for this scope's events only.
    pub fn filter(&self) -> EventFilter {
        EventFilter::new().with_event_type(self.all())
    }

    /// A pending event of type `<prefix>.<rest>`.
    pub fn event(&self, rest: &str) -> Event {
        Event::new(EventSource::System, self.ty(rest))
    }

    /// This scope's events, as `list` returns them.
    ///
    /// # Panics
    /// If `list` fails.
    pub fn list(&self, provider: &dyn Provider) -> Vec<Event> {
        provider.list(&self.filter()).expect("list")
    }
}

impl Default for Scope {
    fn default() -> Self {
        Self::new()
    }
}

/// Asserts `result` failed with `NotSupported`.
fn assert_not_supported<T: std::fmt::Debug>(result: Result<T, ProviderError>, operation: &str) {
    match result {
        Err(error) => assert_eq!(error.kind(), &ProviderErrorKind::NotSupported, "{operation}: {error}"),
        Ok(value) => panic!("{operation} is not supported by capabilities, yet returned Ok({value:?})"),
    }
}

/// Polls `done` every 5 ms until it holds; fails the scenario after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
