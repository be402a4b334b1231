//! The engine behind a [`Broker`](super::Broker): admission, the publish paths, and what the
//! inbound thread feeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::dispatch::backpressure::Backoff;
use crate::dispatch::delivery::{InlineRules, Job, Outbox};
use crate::dispatch::inbound::{InboundPump, Target};
use crate::dispatch::intake::Intake;
use crate::dispatch::retry::RetryPolicy;
use crate::dispatch::ring::{PushBatchError as ReserveError, Reservation};
use crate::dispatch::shard::ShardSet;
use crate::dispatch::spent;
use crate::dispatch::worker::{self, WorkerShared};
use crate::dispatch::writer::Reply;
use crate::error::{
    BatchPublishError, BatchRejection, ConfirmError, HandlerFailures, PublishError, SyncPublishError,
};
use crate::metrics::EngineMetrics;
use crate::provider::Provider;
use crate::provider::memory::StoreTicket;
use crate::subscription::SubscriptionTable;
use crate::{Backpressure, Distribution, Event, Mode, validate_event_type};

use super::stats::SyncCounters;

/// How long a task waiting for room in the writer's backlog first waits before it looks again; the
/// wait doubles each time, up to [`BACKLOG_POLL_LAST`].
const BACKLOG_POLL_FIRST: Duration = Duration::from_micros(10);
const BACKLOG_POLL_LAST: Duration = Duration::from_millis(1);

/// Everything a broker runs: shared by its handles, its inbound thread and, after a shutdown
/// begun on one of its own workers, the thread that completes it.
pub(crate) struct Engine {
    /// Tells this broker's workers apart from other brokers' (see [`worker::current`]).
    pub(crate) id: u64,
    pub(crate) instance_id: compact_str::CompactString,
    pub(crate) mode: Mode,
    pub(crate) distribution: Distribution,
    pub(crate) retry: RetryPolicy,
    pub(crate) backpressure: Backpressure,
    pub(crate) track_status: bool,
    /// Whether published events are written to the provider: to track their status, or because
    /// other instances receive them from it.
    pub(crate) store_events: bool,
    /// Whether they are written inline, on the publishing thread, rather than through the writer
    /// (a provider with [`Capabilities::inline_writes`](crate::Capabilities::inline_writes)).
    pub(crate) inline: bool,
    /// The consumer group key stores are tagged with, when the broker takes part in delivery.
    pub(crate) origin: Option<String>,
    pub(crate) buffer_size: usize,
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) shared: Arc<WorkerShared>,
    pub(crate) shards: ShardSet,
    pub(crate) inbound: Option<Arc<InboundPump>>,
    /// Closed once by shutdown; `publish_sync` and `redrive` run inside it.
    pub(crate) intake: Intake,
    pub(crate) sync: SyncCounters,
    /// `publish_sync` and `redrive` calls in progress, for `drain`.
    pub(crate) sync_calls: super::drain::SyncCalls,
    pub(crate) rejected: AtomicU64,
    /// The highest `published` reported: the counts it is made of are read one after another
    /// while events move, and may add up to less for a moment (never more); reports never go
    /// back.
    pub(crate) published_reported: AtomicU64,
    /// This broker's hold on its instance id for its provider, while it receives (released at
    /// the end of shutdown, or when an inbound thread that outlived it exits).
    pub(crate) claim: parking_lot::Mutex<Option<super::claim::InstanceClaim>>,
    /// Whether shutdown has begun, and its report once it ended.
    pub(crate) shutdown: super::shutdown::Stopping,
    /// How long dropping the last handle waits for shutdown.
    pub(crate) drop_timeout: Duration,
    /// See [`BrokerBuilder::ack_timeout`](crate::BrokerBuilder::ack_timeout).
    pub(crate) ack_timeout: Duration,
    /// The metric state, when the broker records metrics.
    pub(crate) metrics: Option<Arc<EngineMetrics>>,
}

/// How an enqueued event reaches the provider.
pub(crate) enum Store {
    /// Not at all.
    No,
    /// Through the writer.
    Yes,
    /// Through the writer, reporting the write's outcome here.
    Confirmed(Reply),
}

/// Takes back an event that was wrapped for publishing but not accepted. Nothing else holds it
/// then, so this does not copy.
pub(crate) fn unwrap_event(event: Arc<Event>) -> Event {
    Arc::try_unwrap(event).unwrap_or_else(|shared| (*shared).clone())
}

impl Engine {
    pub(crate) fn table(&self) -> &SubscriptionTable {
        &self.shared.table
    }

    /// How deliveries on a caller's thread (`publish_sync`, `redrive`) retry and wait.
    pub(crate) fn inline_rules(&self) -> InlineRules<'_> {
        InlineRules {
            retry: self.retry,
            ack_timeout: self.ack_timeout,
            awaiting: &self.sync.awaiting_acks,
            at_shutdown: &self.sync.at_shutdown,
            shutdown_begun: self.shared.shutdown.receiver(),
        }
    }

    /// Checks an event can be published and fills in the instance id. Moves the event to the
    /// heap, once: it is 300-odd bytes, and the handlers share it; the allocation is a spent
    /// event's when this thread has one (see [`spent`](crate::dispatch::spent)).
    #[inline]
    pub(crate) fn admit(&self, mut event: Event) -> Result<Arc<Event>, PublishError> {
        if let Err(error) = validate_event_type(&event.event_type) {
            return Err(PublishError::InvalidType { event: Box::new(event), error });
        }
        if let Some(key) = event.too_deep_metadata() {
            let key = key.to_owned();
            return Err(PublishError::InvalidMetadata { event: Box::new(event), key });
        }
        if self.intake.is_closed() {
            return Err(PublishError::Closed(Box::new(event)));
        }
        if event.instance_id.is_empty() {
            event.instance_id.clone_from(&self.instance_id);
        }
        Ok(self.allocate(event))
    }

    /// `event` on the heap. Without status tracking the workers hand spent events back, and this
    /// thread builds the event in one of their allocations when it has one; with tracking, the
    /// provider keeps its events, and there are none.
    #[inline]
    fn allocate(&self, event: Event) -> Arc<Event> {
        if self.track_status { Arc::new(event) } else { spent::reuse(event) }
    }

    /// After a publish to `shard`: takes the events its worker handed back, when they are due.
    #[inline]
    fn restock(&self, shard: usize) {
        if !self.track_status {
            self.shards.shard(shard).spent.restock();
        }
    }

    /// How long a publish may wait for room, per the backpressure policy.
    pub(crate) fn patience(&self) -> Option<Duration> {
        match self.backpressure {
            Backpressure::Reject => None,
            Backpressure::Block(timeout) => Some(timeout),
        }
    }

    fn store_for_publish(&self) -> Store {
        if self.store_events { Store::Yes } else { Store::No }
    }

    /// The two-phase publish of one job: reserve a slot on its shard (and room in the writer's
    /// backlog when the event is stored), hand the event's store to the writer, then commit the
    /// slot. The writer therefore always has the store before the worker can send any status of
    /// the event, and an event refused for room is stored nowhere.
    pub(crate) fn enqueue(
        &self,
        mut job: Job,
        patience: Option<Duration>,
        store: Store,
    ) -> Result<(), (ReserveError, Job)> {
        let shard = self.shards.index_for(job.event.partition());
        let backlogged = !matches!(store, Store::No) && !self.inline;
        let reservation = match self.reserve(shard, 1, patience, backlogged) {
            Ok(reservation) => reservation,
            Err(error) => return Err((error, job)),
        };
        match store {
            Store::No => {}
            Store::Yes if self.inline => {
                let mut ticket = StoreTicket::NONE;
                let _ = self.store_inline(std::slice::from_ref(&job.event), |t| ticket = t);
                job.set_stored(ticket);
            }
            Store::Yes => self.shared.writer.store(Arc::clone(&job.event)),
            Store::Confirmed(reply) if self.inline => {
                let mut ticket = StoreTicket::NONE;
                let stored = self.store_inline(std::slice::from_ref(&job.event), |t| ticket = t);
                job.set_stored(ticket);
                let _ = reply.send(stored);
            }
            Store::Confirmed(reply) => self.shared.writer.store_confirmed(Arc::clone(&job.event), reply),
        }
        reservation.commit_one(Some(job));
        self.restock(shard);
        Ok(())
    }

    /// Stores `events` on this thread: the inline path of a provider cheap enough for it; hands
    /// `ticket` each one's ticket in turn, for its job. A failure (a closed provider) is counted
    /// and reported by the next flush, like the writer's.
    fn store_inline(
        &self,
        events: &[Arc<Event>],
        ticket: impl FnMut(StoreTicket),
    ) -> Result<(), crate::ProviderError> {
        let Some(sink) = &self.shared.inline else {
            unreachable!("stores are inline only with an inline provider");
        };
        let origin = self.origin.as_deref();
        self.shared.writer.inline("store_batch", events.len(), || sink.store(events, origin, ticket))
    }

    /// Reserves up to `want` consecutive slots of `shard` (at least one), with as much backlog room
    /// when `stored`, waiting up to `patience` (not at all when `None`, nor when the caller is the
    /// shard's own worker: only it could make room). The clock is read only once a first attempt
    /// fails.
    pub(crate) fn reserve(
        &self,
        shard: usize,
        want: usize,
        patience: Option<Duration>,
        stored: bool,
    ) -> Result<Reservation<'_, Option<Job>>, ReserveError> {
        let patience = patience.filter(|_| worker::current(self.id) != Some(shard));
        let shard = self.shards.shard(shard);
        let producer = &shard.producer;
        let writer = &self.shared.writer;
        let mut deadline = None;
        let mut backoff = Backoff::new();
        loop {
            let admitted = if stored { writer.try_admit(want) } else { want };
            let backlogged = admitted == 0;
            if !backlogged {
                match producer.try_reserve(admitted) {
                    Ok(reservation) => {
                        if stored {
                            writer.release(admitted - reservation.len());
                        }
                        return Ok(reservation);
                    }
                    Err(error) => {
                        if stored {
                            writer.release(admitted);
                        }
                        if error == ReserveError::Closed {
                            return Err(ReserveError::Closed);
                        }
                    }
                }
            } else if producer.is_closed() {
                return Err(ReserveError::Closed);
            }
            let Some(patience) = patience else { return Err(ReserveError::Full) };
            let deadline = *deadline.get_or_insert_with(|| crate::deadline::from_now(patience));
            if Instant::now() >= deadline {
                return Err(ReserveError::Full);
            }
            if backoff.snooze() {
                continue;
            }
            if backlogged {
                // The writer signals nobody when it catches up: poll on a growing timer.
                backoff.sleep();
            } else {
                shard.space.wait_until(deadline, || !producer.is_full() || producer.is_closed());
            }
        }
    }

    /// Waits up to `patience` for room in the writer for what a `publish_sync` hands it, which
    /// takes no ring slot: its statuses, dead letters and, when `store`, one stored event.
    fn admit_backlog(&self, patience: Option<Duration>, store: bool) -> bool {
        let writer = &self.shared.writer;
        let mut deadline = None;
        let mut backoff = Backoff::new();
        loop {
            if writer.has_settle_room() && (!store || writer.try_admit(1) == 1) {
                return true;
            }
            let Some(patience) = patience else { return false };
            let deadline = *deadline.get_or_insert_with(|| crate::deadline::from_now(patience));
            if Instant::now() >= deadline || self.intake.is_closed() {
                return false;
            }
            if !backoff.snooze() {
                backoff.sleep();
            }
        }
    }

    pub(crate) fn rejected(&self, error: ReserveError, event: Arc<Event>) -> PublishError {
        let event = Box::new(unwrap_event(event));
        match error {
            ReserveError::Full => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                PublishError::Full(event)
            }
            ReserveError::Closed => PublishError::Closed(event),
        }
    }

    pub(crate) fn publish(&self, event: Event) -> Result<(), SyncPublishError> {
        match self.mode {
            Mode::Async => Ok(self.publish_async(event)?),
            Mode::Sync => self.publish_sync(event),
        }
    }

    pub(crate) fn publish_async(&self, event: Event) -> Result<(), PublishError> {
        self.publish_within(event, self.patience())
    }

    /// Queues the event, waiting up to `patience` for room (not at all when `None`).
    #[inline]
    pub(crate) fn publish_within(
        &self,
        event: Event,
        patience: Option<Duration>,
    ) -> Result<(), PublishError> {
        let event = self.admit(event)?;
        match self.enqueue(Job::local(event), patience, self.store_for_publish()) {
            Ok(()) => Ok(()),
            Err((error, job)) => Err(self.rejected(error, job.event)),
        }
    }

    /// Queues the event, waiting as the backpressure policy allows without blocking the thread:
    /// for room on the shard through its [`SpaceWaiters`](crate::dispatch::backpressure::SpaceWaiters),
    /// for room in the writer's backlog on a growing timer (the writer signals nobody).
    pub(crate) async fn publish_when_room(&self, event: Event) -> Result<(), PublishError> {
        let event = self.admit(event)?;
        self.enqueue_when_room(Job::local(event), || self.store_for_publish()).await
    }

    /// [`Engine::publish_confirmed`] for async code: waits for room as
    /// [`Engine::publish_when_room`] does, then for the write without blocking the thread.
    pub(crate) async fn publish_confirmed_when_room(
        &self,
        event: Event,
        timeout: Duration,
    ) -> Result<(), ConfirmError> {
        let event = self.admit(event)?;
        let (reply, outcome) = flume::bounded(1);
        self.enqueue_when_room(Job::local(event), || Store::Confirmed(reply.clone())).await?;
        // Only the writer's copy is left: a writer gone without answering disconnects it.
        drop(reply);
        let answer = match crate::deadline::within(timeout, outcome.recv_async()).await {
            Some(received) => {
                received.map_err(|flume::RecvError::Disconnected| flume::RecvTimeoutError::Disconnected)
            }
            None => Err(flume::RecvTimeoutError::Timeout),
        };
        self.confirmed(answer, timeout)
    }

    /// What a confirmed publish tells its caller of the write's answer.
    fn confirmed(
        &self,
        answer: Result<Result<(), crate::ProviderError>, flume::RecvTimeoutError>,
        timeout: Duration,
    ) -> Result<(), ConfirmError> {
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(ConfirmError::NotPersisted(error)),
            Err(flume::RecvTimeoutError::Timeout) => Err(ConfirmError::TimedOut(timeout)),
            Err(flume::RecvTimeoutError::Disconnected) => Err(ConfirmError::NotPersisted(
                crate::provider::closed_error(self.provider.name(), "store_batch"),
            )),
        }
    }

    /// Queues `job`, storing it as `store` says (asked once per attempt), waiting for room as
    /// the backpressure policy allows without blocking the thread.
    async fn enqueue_when_room(&self, mut job: Job, store: impl Fn() -> Store) -> Result<(), PublishError> {
        let index = self.shards.index_for(job.event.partition());
        // Not on the shard's own worker: only it could make room (as in `reserve`).
        let patience = self.patience().filter(|_| worker::current(self.id) != Some(index));
        let shard = self.shards.shard(index);
        let producer = &shard.producer;
        let mut deadline = None;
        // Set once, at the first wait, and kept for the next ones: a task that loses the race for
        // freed slots waits again without arming a new timer.
        let mut timer = None;
        let mut backlog_pause = BACKLOG_POLL_FIRST;
        loop {
            match self.enqueue(job, None, store()) {
                Ok(()) => return Ok(()),
                Err((ReserveError::Full, back)) => job = back,
                Err((error, back)) => return Err(self.rejected(error, back.event)),
            }
            let Some(patience) = patience else {
                return Err(self.rejected(ReserveError::Full, job.event));
            };
            let deadline = *deadline.get_or_insert_with(|| crate::deadline::from_now(patience));
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.rejected(ReserveError::Full, job.event));
            }
            if producer.is_full() {
                let timer = timer.get_or_insert_with(|| futures_timer::Delay::new(left));
                shard.space.room(timer, || !producer.is_full() || producer.is_closed()).await;
            } else {
                // The ring has room, so the writer's backlog was full.
                futures_timer::Delay::new(backlog_pause.min(left)).await;
                backlog_pause = (backlog_pause * 2).min(BACKLOG_POLL_LAST);
            }
        }
    }

    pub(crate) fn publish_sync(&self, event: Event) -> Result<(), SyncPublishError> {
        let Some(_call) = self.begin_sync_call() else {
            // Closed: `admit` reports it (or an invalid type, which takes precedence).
            return Err(match self.admit(event) {
                Err(error) => error.into(),
                Ok(event) => PublishError::Closed(Box::new(unwrap_event(event))).into(),
            });
        };
        let event = self.admit(event)?;
        let by_writer = self.store_events && !self.inline;
        if !self.admit_backlog(self.patience(), by_writer) {
            // A shutdown begun while it waited for room ends the wait: the broker is closed.
            let error = if self.intake.is_closed() { ReserveError::Closed } else { ReserveError::Full };
            return Err(self.rejected(error, event).into());
        }
        let mut ticket = StoreTicket::NONE;
        if by_writer {
            self.shared.writer.store(Arc::clone(&event));
        } else if self.store_events {
            let _ = self.store_inline(std::slice::from_ref(&event), |t| ticket = t);
        }
        self.sync.published.fetch_add(1, Ordering::Relaxed);
        let clock = self.metrics.as_ref().and_then(|m| m.sync_begin());
        let job = Job::stored(event, ticket);
        let mut outbox = Outbox::default();
        outbox.processing(&job, crate::clock::now(), self.track_status);
        // Before the handlers run, as a worker does: while they do, the event is `processing`.
        worker::write_statuses(&self.shared, &mut outbox);
        let set = self.table().load();
        let failures = worker::deliver_on_caller(
            self.table(),
            &set,
            &job,
            self.inline_rules(),
            self.track_status,
            &mut outbox,
            || self.shared.caller_stop(),
        );
        drop(set);
        if let Some(metrics) = &self.metrics {
            metrics.sync_end(&job.event, &outbox.counts, clock);
        }
        self.sync.add(&outbox.counts);
        worker::settle(&self.shared, &mut outbox);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(SyncPublishError::HandlerFailed(HandlerFailures::new(failures)))
        }
    }

    pub(crate) fn publish_batch(&self, events: Vec<Event>) -> Result<(), BatchPublishError> {
        let invalid = events.iter().enumerate().find_map(|(index, event)| {
            match validate_event_type(&event.event_type) {
                Err(error) => Some(BatchRejection::InvalidType { index, error }),
                Ok(()) => event
                    .too_deep_metadata()
                    .map(|key| BatchRejection::InvalidMetadata { index, key: key.to_owned() }),
            }
        });
        if let Some(reason) = invalid {
            return Err(BatchPublishError { accepted: 0, rejected: events, reason });
        }
        // Each event keeps its position in the batch, to hand rejected ones back in order.
        let mut by_shard: Vec<Vec<(usize, Arc<Event>)>> = vec![Vec::new(); self.shards.len()];
        for (position, mut event) in events.into_iter().enumerate() {
            if event.instance_id.is_empty() {
                event.instance_id.clone_from(&self.instance_id);
            }
            by_shard[self.shards.index_for(event.partition())].push((position, self.allocate(event)));
        }
        let mut accepted = 0;
        let mut rejected: Vec<(usize, Arc<Event>)> = Vec::new();
        let mut reason = None;
        for (shard, mut group) in by_shard.into_iter().enumerate() {
            while !group.is_empty() {
                match self.reserve(shard, group.len(), self.patience(), self.store_events && !self.inline) {
                    Ok(reservation) => {
                        let taken: Vec<Arc<Event>> =
                            group.drain(..reservation.len()).map(|(_, e)| e).collect();
                        accepted += taken.len();
                        let mut tickets = Vec::with_capacity(taken.len());
                        if self.store_events && self.inline {
                            let _ = self.store_inline(&taken, |ticket| tickets.push(ticket));
                        } else if self.store_events {
                            self.shared.writer.store_many(taken.clone());
                        }
                        // A store that failed part way (a closed provider) leaves the rest without.
                        tickets.resize(taken.len(), StoreTicket::NONE);
                        reservation.commit(
                            taken
                                .into_iter()
                                .zip(tickets)
                                .map(|(event, ticket)| Some(Job::stored(event, ticket))),
                        );
                        self.restock(shard);
                    }
                    Err(error) => {
                        reason.get_or_insert(match error {
                            ReserveError::Full => BatchRejection::Full,
                            ReserveError::Closed => BatchRejection::Closed,
                        });
                        if error == ReserveError::Full {
                            self.rejected.fetch_add(group.len() as u64, Ordering::Relaxed);
                        }
                        rejected.append(&mut group);
                    }
                }
            }
        }
        match reason {
            None => Ok(()),
            Some(reason) => {
                rejected.sort_unstable_by_key(|(position, _)| *position);
                let rejected = rejected.into_iter().map(|(_, event)| unwrap_event(event)).collect();
                Err(BatchPublishError { accepted, rejected, reason })
            }
        }
    }

    pub(crate) fn publish_confirmed(&self, event: Event, timeout: Duration) -> Result<(), ConfirmError> {
        let event = self.admit(event)?;
        let (reply, outcome) = flume::bounded(1);
        if let Err((error, job)) = self.enqueue(Job::local(event), self.patience(), Store::Confirmed(reply)) {
            return Err(self.rejected(error, job.event).into());
        }
        self.confirmed(outcome.recv_deadline(crate::deadline::from_now(timeout)), timeout)
    }
}

impl Target for Engine {
    fn room(&self) -> usize {
        // Nothing fetched while the writer is behind on settling: the workers hold back too.
        if self.shared.writer.has_settle_room() { self.shards.free_slots() } else { 0 }
    }

    fn place(&self, job: Job, patience: Duration) -> Result<(), (Job, bool)> {
        self.enqueue(job, Some(patience), Store::No)
            .map_err(|(error, job)| (job, error == ReserveError::Closed))
    }

    fn table(&self) -> &SubscriptionTable {
        &self.shared.table
    }

    fn inbound_ended(&self) -> u64 {
        self.shared.inbound_ended.get()
    }

    fn wait_for_ends(&self, seen: u64, timeout: Duration) {
        self.shared.inbound_ended.wait_past(seen, timeout);
    }

    fn hold(&self, tokens: impl IntoIterator<Item = crate::AckToken>) {
        if let Some(held) = &self.shared.held_inbound {
            held.lock().extend(tokens);
        }
    }

    fn release(&self, tokens: &[crate::AckToken]) {
        if let Some(held) = &self.shared.held_inbound {
            let mut held = held.lock();
            for token in tokens {
                held.remove(token);
            }
        }
    }

    fn held_tokens(&self) -> Vec<crate::AckToken> {
        self.shared
            .held_inbound
            .as_ref()
            .map(|held| held.lock().iter().copied().collect())
            .unwrap_or_default()
    }

    fn settle(&self, outbox: &mut Outbox) {
        self.shared.writer.settle(outbox);
    }
}
