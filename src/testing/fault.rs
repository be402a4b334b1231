//! A provider that misbehaves on request: errors, hangs, panics, slowness, a cut connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::{
    Ack, AckToken, Capabilities, ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter,
    EventSink, EventStore, GroupNamespace, Inbound, InboundConfig, InboundEvent, Provider, ProviderStats,
    ReplayFrom, ReplayPage, StatusUpdate,
};
use crate::{Event, EventId, Pattern};

/// A provider call, as [`FaultyProvider`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs, reason = "each variant is the method of the same name")]
pub enum Operation {
    StoreBatch,
    UpdateStatusBatch,
    StoreDeadLetters,
    Flush,
    Get,
    List,
    Delete,
    Replay,
    ListDeadLetters,
    GetDeadLetter,
    DeleteDeadLetter,
    Stats,
    OpenInbound,
    DeleteGroup,
    Close,
    /// [`Inbound::fetch`] of a source the provider opened.
    Fetch,
    /// [`Inbound::ack`].
    Ack,
    /// [`Inbound::nak`].
    Nak,
    /// [`Inbound::extend`].
    Extend,
    /// [`Inbound::set_filter`].
    SetFilter,
    /// [`Inbound::close`].
    CloseInbound,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Self; 21] = [
        Self::StoreBatch,
        Self::UpdateStatusBatch,
        Self::StoreDeadLetters,
        Self::Flush,
        Self::Get,
        Self::List,
        Self::Delete,
        Self::Replay,
        Self::ListDeadLetters,
        Self::GetDeadLetter,
        Self::DeleteDeadLetter,
        Self::Stats,
        Self::OpenInbound,
        Self::DeleteGroup,
        Self::Close,
        Self::Fetch,
        Self::Ack,
        Self::Nak,
        Self::Extend,
        Self::SetFilter,
        Self::CloseInbound,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::StoreBatch => "store_batch",
            Self::UpdateStatusBatch => "update_status_batch",
            Self::StoreDeadLetters => "store_dead_letters",
            Self::Flush => "flush",
            Self::Get => "get",
            Self::List => "list",
            Self::Delete => "delete",
            Self::Replay => "replay",
            Self::ListDeadLetters => "list_dead_letters",
            Self::GetDeadLetter => "get_dead_letter",
            Self::DeleteDeadLetter => "delete_dead_letter",
            Self::Stats => "stats",
            Self::OpenInbound => "open_inbound",
            Self::DeleteGroup => "delete_group",
            Self::Close => "close",
            Self::Fetch => "fetch",
            Self::Ack => "ack",
            Self::Nak => "nak",
            Self::Extend => "extend",
            Self::SetFilter => "set_filter",
            Self::CloseInbound => "close_inbound",
        }
    }
}

/// What an injected fault does to the calls of its [`Operation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The next `times` calls fail with `kind` without reaching the wrapped provider (`None`:
    /// every call until healed). Then calls pass through again.
    Fail {
        /// The error's kind.
        kind: ProviderErrorKind,
        /// How many calls fail.
        times: Option<u64>,
    },
    /// Calls block until the fault is healed or `at_most` passes, then pass through: a backend that
    /// stopped answering. The bound keeps a forgotten hang from outliving the test.
    Hang {
        /// The longest a call blocks.
        at_most: Duration,
    },
    /// The next `times` calls panic (`None`: every call until healed).
    Panic {
        /// How many calls panic.
        times: Option<u64>,
    },
    /// Every call waits this long first, then passes through.
    Delay(Duration),
}

impl Fault {
    /// Fails every call with [`ProviderErrorKind::Unavailable`] until healed: a backend that is down.
    pub fn unavailable() -> Self {
        Self::Fail { kind: ProviderErrorKind::Unavailable("injected outage".into()), times: None }
    }

    /// Fails the next `times` calls with [`ProviderErrorKind::Unavailable`].
    pub fn unavailable_times(times: u64) -> Self {
        Self::Fail { kind: ProviderErrorKind::Unavailable("injected outage".into()), times: Some(times) }
    }

    /// Fails every call with a permanent [`ProviderErrorKind::Backend`] error until healed.
    pub fn permanent() -> Self {
        Self::Fail { kind: ProviderErrorKind::Backend("injected permanent failure".into()), times: None }
    }
}

/// Wraps a provider and makes chosen operations misbehave; everything else passes through.
/// Sources it opens misbehave on the inbound operations the same way.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::testing::{Fault, FaultyProvider, Operation};
/// use eventbroker::{Event, EventSource, EventSink, EventStore, MemoryProvider};
///
/// let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
/// faulty.inject(Operation::StoreBatch, Fault::unavailable_times(2));
/// let event = Arc::new(Event::new(EventSource::System, "a.b"));
/// assert!(faulty.store_batch(&[Arc::clone(&event)], None).is_err());
/// assert!(faulty.store_batch(&[Arc::clone(&event)], None).is_err());
/// faulty.store_batch(&[Arc::clone(&event)], None)?; // the third passes
/// assert_eq!(faulty.calls(Operation::StoreBatch), 3);
/// assert!(faulty.get(event.id)?.is_some());
/// # Ok::<(), eventbroker::ProviderError>(())
/// ```
pub struct FaultyProvider {
    inner: Arc<dyn Provider>,
    faults: Arc<Faults>,
    /// Events no write can hold (see [`FaultyProvider::refuse_events`]).
    refused: Mutex<Option<Arc<EventPredicate>>>,
}

type EventPredicate = dyn Fn(&Event) -> bool + Send + Sync;

#[derive(Default)]
struct Faults {
    active: Mutex<HashMap<Operation, Fault>>,
    /// Notified when faults are healed, to end hangs.
    healed: Condvar,
    calls: HashMap<Operation, AtomicU64>,
}

impl Faults {
    fn new() -> Self {
        Self { calls: Operation::ALL.iter().map(|&op| (op, AtomicU64::new(0))).collect(), ..Self::default() }
    }

    /// Applies the fault of `op`, if any: `Err` to fail the call, `Ok` to go on to the provider.
    fn check(&self, provider: &'static str, op: Operation) -> Result<(), ProviderError> {
        // Relaxed: a count for tests, read after the calls are done.
        self.calls[&op].fetch_add(1, Ordering::Relaxed);
        let mut active = self.active.lock();
        let Some(fault) = active.get(&op).cloned() else { return Ok(()) };
        match fault {
            Fault::Fail { kind, times } => {
                Self::use_up(&mut active, op, times);
                Err(ProviderError::new(provider, op.name(), kind))
            }
            Fault::Panic { times } => {
                Self::use_up(&mut active, op, times);
                drop(active);
                panic!("injected panic in {}", op.name());
            }
            Fault::Hang { at_most } => {
                let until = Instant::now().checked_add(at_most).unwrap_or_else(Instant::now);
                while matches!(active.get(&op), Some(Fault::Hang { .. })) {
                    if self.healed.wait_until(&mut active, until).timed_out() {
                        break;
                    }
                }
                Ok(())
            }
            Fault::Delay(delay) => {
                drop(active);
                std::thread::sleep(delay);
                Ok(())
            }
        }
    }

    /// Counts one use of a fault limited to `times` calls, removing it after the last.
    fn use_up(active: &mut HashMap<Operation, Fault>, op: Operation, times: Option<u64>) {
        let Some(times) = times else { return };
        if times <= 1 {
            active.remove(&op);
        } else if let Some(Fault::Fail { times: left, .. } | Fault::Panic { times: left }) =
            active.get_mut(&op)
        {
            *left = Some(times - 1);
        }
    }
}

impl FaultyProvider {
    /// Wraps `inner`, with no fault injected.
    pub fn new(inner: Arc<dyn Provider>) -> Arc<Self> {
        Arc::new(Self { inner, faults: Arc::new(Faults::new()), refused: Mutex::new(None) })
    }

    /// Makes `store_batch` and `store_dead_letters` refuse, storing nothing, any call that holds an
    /// event `refuse` picks out, with [`ProviderErrorKind::InvalidInput`] naming it: a backend
    /// that cannot hold that event, as a PostgreSQL row cannot hold a time before 1677. Replaces
    /// any earlier choice; `heal_all` does not end it, `accept_all_events` does.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use eventbroker::testing::FaultyProvider;
    /// use eventbroker::{Event, EventSink, EventSource, MemoryProvider};
    ///
    /// let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    /// faulty.refuse_events(|event| event.event_type == "bad.one");
    /// let (good, bad) = (Event::new(EventSource::System, "good.one"), Event::new(EventSource::System, "bad.one"));
    /// assert!(faulty.store_batch(&[Arc::new(good.clone()), Arc::new(bad)], None).is_err());
    /// faulty.store_batch(&[Arc::new(good)], None)?;
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    pub fn refuse_events(&self, refuse: impl Fn(&Event) -> bool + Send + Sync + 'static) {
        *self.refused.lock() = Some(Arc::new(refuse));
    }

    /// Ends [`refuse_events`](Self::refuse_events).
    pub fn accept_all_events(&self) {
        *self.refused.lock() = None;
    }

    /// The refusal of a write holding `events`, if `refuse_events` picks one out.
    fn refuse<'e>(
        &self,
        op: Operation,
        mut events: impl Iterator<Item = &'e Event>,
    ) -> Result<(), ProviderError> {
        let Some(refuse) = self.refused.lock().clone() else { return Ok(()) };
        match events.find(|event| refuse(event)) {
            None => Ok(()),
            Some(event) => Err(ProviderError::new(
                self.inner.name(),
                op.name(),
                ProviderErrorKind::InvalidInput(format!(
                    "event {} cannot be stored; nothing of the batch was",
                    event.id
                )),
            )),
        }
    }

    /// Makes `op` misbehave as `fault` says, replacing any fault it had.
    pub fn inject(&self, op: Operation, fault: Fault) {
        self.faults.active.lock().insert(op, fault);
    }

    /// Injects `fault` into every operation but `close` (which the test needs to end cleanly):
    /// a backend that is gone, as far as this provider handle can tell.
    pub fn cut(&self, fault: &Fault) {
        let mut active = self.faults.active.lock();
        for op in Operation::ALL.into_iter().filter(|&op| op != Operation::Close) {
            active.insert(op, fault.clone());
        }
    }

    /// Removes the fault of `op`; a call hanging in it returns.
    pub fn heal(&self, op: Operation) {
        self.faults.active.lock().remove(&op);
        self.faults.healed.notify_all();
    }

    /// Removes every fault; calls hanging return.
    pub fn heal_all(&self) {
        self.faults.active.lock().clear();
        self.faults.healed.notify_all();
    }

    /// Calls of `op` so far, failed ones included.
    pub fn calls(&self, op: Operation) -> u64 {
        // Relaxed: see `Faults::check`.
        self.faults.calls[&op].load(Ordering::Relaxed)
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &Arc<dyn Provider> {
        &self.inner
    }

    fn check(&self, op: Operation) -> Result<(), ProviderError> {
        self.faults.check(self.inner.name(), op)
    }
}

impl std::fmt::Debug for FaultyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyProvider")
            .field("inner", &self.inner.name())
            .field("faults", &*self.faults.active.lock())
            .field("refuses_events", &self.refused.lock().is_some())
            .finish()
    }
}

impl EventSink for FaultyProvider {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        self.check(Operation::StoreBatch)?;
        self.refuse(Operation::StoreBatch, events.iter().map(|event| &**event))?;
        self.inner.store_batch(events, origin)
    }

    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        self.check(Operation::UpdateStatusBatch)?;
        self.inner.update_status_batch(updates)
    }

    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError> {
        self.check(Operation::StoreDeadLetters)?;
        self.refuse(Operation::StoreDeadLetters, letters.iter().map(|letter| &letter.event))?;
        self.inner.store_dead_letters(letters)
    }

    fn flush(&self) -> Result<(), ProviderError> {
        self.check(Operation::Flush)?;
        self.inner.flush()
    }
}

impl EventStore for FaultyProvider {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        self.check(Operation::Get)?;
        self.inner.get(id)
    }

    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        self.check(Operation::List)?;
        self.inner.list(filter)
    }

    fn delete(&self, id: EventId) -> Result<bool, ProviderError> {
        self.check(Operation::Delete)?;
        self.inner.delete(id)
    }

    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<ReplayPage, ProviderError> {
        self.check(Operation::Replay)?;
        self.inner.replay(from, pattern, limit)
    }

    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError> {
        self.check(Operation::ListDeadLetters)?;
        self.inner.list_dead_letters(filter)
    }

    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError> {
        self.check(Operation::GetDeadLetter)?;
        self.inner.get_dead_letter(id)
    }

    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError> {
        self.check(Operation::DeleteDeadLetter)?;
        self.inner.delete_dead_letter(id)
    }

    fn stats(&self) -> Result<ProviderStats, ProviderError> {
        self.check(Operation::Stats)?;
        self.inner.stats()
    }
}

impl Provider for FaultyProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        // Its calls can hang, fail and panic now: a broker must not make them inline.
        Capabilities { inline_writes: false, ..self.inner.capabilities() }
    }

    fn open_inbound(&self, config: &InboundConfig) -> Result<Arc<dyn Inbound>, ProviderError> {
        self.check(Operation::OpenInbound)?;
        let inner = self.inner.open_inbound(config)?;
        Ok(Arc::new(FaultyInbound { inner, provider: self.inner.name(), faults: Arc::clone(&self.faults) }))
    }

    fn delete_group(&self, group: &ConsumerGroup) -> Result<bool, ProviderError> {
        self.check(Operation::DeleteGroup)?;
        self.inner.delete_group(group)
    }

    /// The inner provider's: its groups are the ones opened through this one. Never a fault, as
    /// it asks the backend nothing.
    fn group_namespace(&self) -> GroupNamespace {
        self.inner.group_namespace()
    }

    fn close(&self) -> Result<(), ProviderError> {
        self.check(Operation::Close)?;
        self.inner.close()
    }
}

/// A source opened through a [`FaultyProvider`]: misbehaves on the inbound operations.
struct FaultyInbound {
    inner: Arc<dyn Inbound>,
    provider: &'static str,
    faults: Arc<Faults>,
}

impl Inbound for FaultyInbound {
    fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError> {
        self.faults.check(self.provider, Operation::Fetch)?;
        self.inner.fetch(max, wait)
    }

    fn ack(&self, acks: &[Ack]) -> Result<(), ProviderError> {
        self.faults.check(self.provider, Operation::Ack)?;
        self.inner.ack(acks)
    }

    fn nak(&self, tokens: &[AckToken], delay: Duration) -> Result<(), ProviderError> {
        self.faults.check(self.provider, Operation::Nak)?;
        self.inner.nak(tokens, delay)
    }

    fn extend(&self, tokens: &[AckToken]) -> Result<(), ProviderError> {
        self.faults.check(self.provider, Operation::Extend)?;
        self.inner.extend(tokens)
    }

    fn set_filter(&self, patterns: &[Pattern]) -> Result<(), ProviderError> {
        self.faults.check(self.provider, Operation::SetFilter)?;
        self.inner.set_filter(patterns)
    }

    fn lost(&self) -> u64 {
        self.inner.lost()
    }

    fn close(&self) -> Result<(), ProviderError> {
        self.faults.check(self.provider, Operation::CloseInbound)?;
        self.inner.close()
    }
}
