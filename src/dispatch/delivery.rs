//! Delivery: running one handler for one job, and the bookkeeping that turns how a job's deliveries
//! ended into its final status, its dead letters, its acknowledgement and the counters.
//!
//! Shared by the shard workers, whose retries wait in a delay queue, and the caller-thread paths
//! (`publish_sync`, `redrive`), whose retries sleep on the caller. Either way a job is tracked by
//! itself, never by its event id: the same event published twice (a clone, a replay) is two jobs
//! with two sets of deliveries.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;

use crate::dispatch::acked::{Delivery, Handed, Outcome, Reply};
use crate::dispatch::retry::RetryPolicy;
use crate::error::DeliveryFailure;
use crate::provider::memory::StoreTicket;
use crate::provider::{Ack, AckToken, DeadLetter, DeadLetterId, StatusUpdate};
use crate::subscription::{DeliveryError, Subscription, SubscriptionTable, Target};
use crate::{Event, EventStatus, SubscriptionId};

/// How a job entered the engine, which decides what its bookkeeping writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Published on this broker: stored by the publisher, statuses tracked when configured.
    Local {
        /// The number the memory provider's store of the event took and the event's slot there,
        /// when the broker stored it there inline: its [`StoreTicket`], whose status changes the
        /// worker writes with it; [`StoreTicket::NONE`]'s otherwise. (Two fields here rather than
        /// the ticket, or a field of [`Job`]: either would add a word to the job.)
        stored: u64,
        slot: u32,
    },
    /// Re-delivered from the store by `replay`: the stored event and its history stay untouched.
    Replayed,
    /// Fetched from another instance: acknowledged once every delivery has ended.
    Inbound(AckToken),
}

impl Origin {
    /// The ticket of a local job's store ([`StoreTicket::NONE`] when not stored inline, or not
    /// local).
    pub(crate) fn ticket(self) -> StoreTicket {
        match self {
            Self::Local { stored, slot } => StoreTicket { number: stored, slot },
            Self::Replayed | Self::Inbound(_) => StoreTicket::NONE,
        }
    }
}

/// One event on its way to its handlers: the ring's item (`None` is a slot reserved and then
/// abandoned).
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) event: Arc<Event>,
    pub(crate) origin: Origin,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<Option<Job>>() <= 24, "a ring slot holds a job in three words");

impl Job {
    pub(crate) fn local(event: Arc<Event>) -> Self {
        Self::stored(event, StoreTicket::NONE)
    }

    /// A local job of an event stored with `ticket` (see [`Origin::Local`]).
    pub(crate) fn stored(event: Arc<Event>, ticket: StoreTicket) -> Self {
        Self { event, origin: Origin::Local { stored: ticket.number, slot: ticket.slot } }
    }

    /// Records its event's store, for a local job (only those are stored).
    pub(crate) fn set_stored(&mut self, ticket: StoreTicket) {
        if let Origin::Local { stored, slot } = &mut self.origin {
            (*stored, *slot) = (ticket.number, ticket.slot);
        }
    }

    /// Its event's store ([`StoreTicket::NONE`] when not stored inline, or not local).
    pub(crate) fn ticket(&self) -> StoreTicket {
        self.origin.ticket()
    }

    /// Whether this job's status changes are written (given that status tracking is on): a local
    /// job's, and an inbound one's whose publisher is no broker (an empty `instance_id`: a
    /// database change a trigger captured, an outbox write, an application's own store). Nobody
    /// else writes the lifecycle of such an event, so the brokers that handle it do (in fan-out
    /// each of them, the last to end writing the final status); a broker's event has its
    /// publisher for that.
    fn tracked(&self) -> bool {
        match self.origin {
            Origin::Local { .. } => true,
            Origin::Inbound(_) => self.event.instance_id.is_empty(),
            Origin::Replayed => false,
        }
    }
}

/// How one attempt of one delivery went.
pub(crate) enum Attempt {
    Delivered,
    /// The subscriber is gone (a stream whose receiver was dropped): the subscription ends.
    Gone,
    /// The handler returned an error or panicked.
    Failed(String),
    /// Handed to an acknowledged subscription's consumer: its outcome comes through the reply
    /// the attempt was made with.
    Awaiting,
}

/// Makes attempt number `attempts` of one delivery: runs the handler once, or hands the event to
/// an acknowledged subscription's channel with the reply `reply` makes. A panic is caught and
/// becomes a failure; a panic payload whose own drop panics is contained too, so nothing a
/// handler does can unwind into its caller.
pub(crate) fn attempt(
    subscription: &Subscription,
    event: &Arc<Event>,
    attempts: u32,
    reply: impl FnOnce() -> (Reply, Instant),
) -> Attempt {
    let handler = match &subscription.target {
        Target::Handler(handler) => handler,
        Target::Stream(channel) => {
            return match channel.send(event) {
                Ok(()) => Attempt::Delivered,
                Err(DeliveryError::Gone) => Attempt::Gone,
                Err(DeliveryError::Failed(error)) => Attempt::Failed(error),
            };
        }
        Target::Acked(channel) => {
            let (reply, deadline) = reply();
            return match channel.send(Delivery::new(Arc::clone(event), attempts, reply, deadline)) {
                Handed::Queued => Attempt::Awaiting,
                Handed::Full => Attempt::Failed(format!(
                    "acknowledged stream is full ({} deliveries)",
                    channel.capacity()
                )),
                Handed::Gone => Attempt::Gone,
            };
        }
    };
    match catch_unwind(AssertUnwindSafe(|| handler(event))) {
        Ok(Ok(())) => Attempt::Delivered,
        Ok(Err(DeliveryError::Gone)) => Attempt::Gone,
        Ok(Err(DeliveryError::Failed(error))) => Attempt::Failed(error),
        Err(payload) => {
            let message = panic_message(&*payload);
            drop_contained(payload);
            Attempt::Failed(format!("handler panicked: {message}"))
        }
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(ToString::to_string)
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}

/// Drops a panic payload without letting a panic in its `Drop` escape. The payload of such a
/// second panic is leaked, not dropped: dropping it could panic again.
pub(crate) fn drop_contained(payload: Box<dyn Any + Send>) {
    if let Err(nested) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(nested);
    }
}

/// Counts of what deliveries did, kept by whoever runs them and published as statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) unrouted: u64,
    pub(crate) handler_failures: u64,
    pub(crate) retries: u64,
    pub(crate) dead_letters: u64,
    /// Ring slots a publisher reserved and abandoned (taken as `None`): no event, but taken, so
    /// `Broker::drain` counts them as ended.
    pub(crate) abandoned: u64,
    /// Inbound jobs given back to their group unhandled (see `ShardStats::returned`):
    /// ended here, so `Broker::drain` counts them.
    pub(crate) returned: u64,
}

/// The deliveries of one job still in flight, and how those that ended went.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Deliveries not yet ended (waiting for a retry).
    pub(crate) outstanding: u32,
    failed: bool,
    /// The error of the last delivery that gave up.
    error: String,
    /// The retries that delivery made.
    failed_retries: u32,
    /// Most retries a delivery that ended well made.
    retries: u32,
}

impl Tally {
    /// A delivery ended well after `attempts`.
    pub(crate) fn delivered(&mut self, attempts: u32) {
        self.retries = self.retries.max(attempts.saturating_sub(1));
    }

    /// A delivery gave up with `failure`: the job has failed.
    fn gave_up(&mut self, failure: &DeliveryFailure) {
        self.failed = true;
        failure.error.clone_into(&mut self.error);
        self.failed_retries = failure.attempts.saturating_sub(1);
    }

    /// Whether a delivery of the job failed for good.
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    /// The final status of the event whose deliveries ended so: `failed` with the error and the
    /// retries of the delivery that gave up last when one did, else `completed` with the most
    /// retries a delivery took.
    pub(crate) fn finished(self, id: crate::EventId) -> StatusUpdate {
        if self.failed {
            finished(id, EventStatus::Failed, self.error, self.failed_retries)
        } else {
            finished(id, EventStatus::Completed, String::new(), self.retries)
        }
    }
}

/// What deliveries produced for the writer (statuses, dead letters, acknowledgements) and for the
/// counters, gathered over a worker turn or one caller-thread publish.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) statuses: Vec<StatusUpdate>,
    /// The ticket of each of `statuses`' events' store, in step with it (see
    /// [`Outbox::push_status`]).
    pub(crate) tickets: Vec<StoreTicket>,
    pub(crate) dead_letters: Vec<DeadLetter>,
    /// The inbound jobs with a dead letter in `dead_letters`, by letter: a job whose letter cannot
    /// be stored must not be acknowledged.
    pub(crate) letter_tokens: Vec<(DeadLetterId, AckToken)>,
    pub(crate) acks: Vec<Ack>,
    /// Inbound jobs given back unfinished (shutdown), redelivered at once.
    pub(crate) naks: Vec<AckToken>,
    /// Inbound jobs still being worked on: their claim idle time restarts.
    pub(crate) extends: Vec<AckToken>,
    /// Subscriptions whose subscriber is gone, to end.
    pub(crate) gone: Vec<SubscriptionId>,
    pub(crate) counts: Counts,
}

impl Outbox {
    /// Adds `update`, of an event stored with `ticket`.
    pub(crate) fn push_status(&mut self, update: StatusUpdate, ticket: StoreTicket) {
        self.statuses.push(update);
        self.tickets.push(ticket);
    }

    /// Takes the status updates out, dropping their tickets: for the writer, which writes by id.
    pub(crate) fn take_statuses(&mut self) -> Vec<StatusUpdate> {
        self.tickets.clear();
        std::mem::take(&mut self.statuses)
    }

    /// Whether there is anything for the writer or the subscription table.
    pub(crate) fn has_work(&self) -> bool {
        !(self.statuses.is_empty()
            && self.dead_letters.is_empty()
            && self.acks.is_empty()
            && self.naks.is_empty()
            && self.extends.is_empty()
            && self.gone.is_empty())
    }

    /// Records one attempt's outcome for `subscription`; `Some(error)` when it failed.
    pub(crate) fn record(&mut self, subscription: &Subscription, outcome: Attempt) -> Option<String> {
        match outcome {
            // An awaited one's caller records its outcome when it comes (see `Outbox::outcome`).
            Attempt::Delivered | Attempt::Awaiting => None,
            Attempt::Gone => {
                self.gone.push(subscription.id);
                None
            }
            Attempt::Failed(error) => {
                self.counts.handler_failures += 1;
                Some(error)
            }
        }
    }

    /// An acknowledged delivery's outcome came; `Some(error)` when it failed.
    pub(crate) fn outcome(&mut self, outcome: Outcome) -> Option<String> {
        let error = outcome.err()?;
        self.counts.handler_failures += 1;
        Some(error)
    }

    /// A retry was scheduled.
    pub(crate) fn retry_scheduled(&mut self) {
        self.counts.retries += 1;
    }

    /// A delivery gave up: its dead letter goes to the writer, and its job is marked failed.
    pub(crate) fn give_up(&mut self, job: &Job, failure: &DeliveryFailure, tally: &mut Tally) {
        let letter = dead_letter(&job.event, failure);
        if let Origin::Inbound(token) = job.origin {
            self.letter_tokens.push((letter.id, token));
        }
        self.dead_letters.push(letter);
        self.counts.dead_letters += 1;
        tally.gave_up(failure);
    }

    /// Every delivery of `job` has ended: its final status (when tracked), its acknowledgement
    /// (when inbound) and the counts.
    pub(crate) fn settle(&mut self, job: &Job, tally: Tally, track_status: bool) {
        let failed = tally.failed;
        if failed {
            self.counts.failed += 1;
        } else {
            self.counts.completed += 1;
        }
        if track_status && job.tracked() {
            self.push_status(tally.finished(job.event.id), job.ticket());
        }
        if let Origin::Inbound(token) = job.origin {
            self.acks.push(if failed { Ack::dead_lettered(token) } else { Ack::handled(token) });
        }
    }

    /// `job` matched no subscription: it completes at once.
    pub(crate) fn unrouted(&mut self, job: &Job, track_status: bool) {
        self.counts.unrouted += 1;
        self.settle(job, Tally::default(), track_status);
    }

    /// `job` is being processed: its `processing` status, when tracked.
    pub(crate) fn processing(&mut self, job: &Job, at: Timestamp, track_status: bool) {
        if track_status && job.tracked() {
            let update = StatusUpdate::new(job.event.id, EventStatus::Processing).with_processed_at(at);
            self.push_status(update, job.ticket());
        }
    }
}

/// Builds the dead letter of a delivery that gave up.
pub(crate) fn dead_letter(event: &Event, failure: &DeliveryFailure) -> DeadLetter {
    let mut failed = event.clone();
    failed.status = EventStatus::Failed;
    failed.error.clone_from(&failure.error);
    failed.retry_count = failure.attempts.saturating_sub(1);
    DeadLetter::new(
        failed,
        failure.subscription_id,
        failure.pattern.clone(),
        failure.error.clone(),
        failure.attempts,
    )
}

/// The failure of a delivery to `subscription` after `attempts`.
pub(crate) fn failure(subscription: &Subscription, error: String, attempts: u32) -> DeliveryFailure {
    DeliveryFailure {
        subscription_id: subscription.id,
        pattern: subscription.pattern.to_string(),
        error,
        attempts,
    }
}

/// The final status of an event.
fn finished(id: crate::EventId, status: EventStatus, error: String, retries: u32) -> StatusUpdate {
    StatusUpdate::new(id, status)
        .with_error(error)
        .with_retry_count(retries)
        .with_completed_at(crate::clock::now())
}

/// How deliveries made on the caller's thread retry, how long they wait for an acknowledgement,
/// where they count while they wait (the broker's `awaiting_acks`), and where they count what
/// they did once shutdown began (for its report).
#[derive(Debug, Clone, Copy)]
pub(crate) struct InlineRules<'a> {
    pub(crate) retry: RetryPolicy,
    pub(crate) ack_timeout: Duration,
    pub(crate) awaiting: &'a AtomicU64,
    pub(crate) at_shutdown: &'a AtShutdown,
    /// Disconnected once shutdown has begun (see `ShutdownSignal::begin`).
    pub(crate) shutdown_begun: &'a flume::Receiver<()>,
}

/// What deliveries made on callers' threads (`publish_sync`, `redrive`) did after shutdown began,
/// counted as a worker's `WorkerReport` counts its own, for the shutdown report: shutdown waits
/// for those calls to return before it reads these. Relaxed: counts.
#[derive(Debug, Default)]
pub(crate) struct AtShutdown {
    /// Retries made.
    pub(crate) retries_run: AtomicU64,
    /// Deliveries that shutdown ended, each dead-lettered: a retry not due before it, or an
    /// acknowledgement not settled by it.
    pub(crate) dead_lettered: AtomicU64,
}

impl AtShutdown {
    fn retry_made(&self) {
        self.retries_run.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
}

/// One in a count while it lives (a caller-thread wait in `awaiting_acks`), even through a panic.
struct Counted<'a>(&'a AtomicU64);

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        // Relaxed, here and in `drop`: a count for statistics.
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a delivery made on the caller's thread ended.
pub(crate) enum Inline {
    /// The handler succeeded, after this many attempts.
    Delivered { attempts: u32 },
    /// The subscriber is gone (a dropped stream); it has been unsubscribed.
    Gone,
    /// Every attempt failed, or the broker shut down before the next one was due.
    Failed(DeliveryFailure),
}

/// Delivers on the caller's thread (`publish_sync`, `redrive`), retrying per `policy` with the
/// backoff slept between attempts. A retry not due before `shutdown()` (once shutdown began, a
/// little before its deadline: [`WorkerShared::caller_stop`](super::worker::WorkerShared::caller_stop))
/// is not made: the delivery fails, as a worker's would, in time for its dead letter to be
/// written.
///
/// An acknowledged delivery is waited for on the caller's thread, up to the rules' `ack_timeout`
/// (or `shutdown()`, when that comes first).
pub(crate) fn deliver_inline(
    table: &SubscriptionTable,
    subscription: &Subscription,
    event: &Arc<Event>,
    rules: InlineRules,
    outbox: &mut Outbox,
    shutdown: impl Fn() -> Option<Instant>,
) -> Inline {
    let mut attempts: u32 = 0;
    let mut last_error = String::new();
    loop {
        attempts = attempts.saturating_add(1);
        // Whether shutdown stopped waiting for this attempt's acknowledgement.
        let mut ended_by_shutdown = false;
        let mut waiting = None;
        let outcome = attempt(subscription, event, attempts, || {
            let (reply, outcome) = flume::bounded(1);
            let due = crate::deadline::from_now(rules.ack_timeout);
            waiting = Some((outcome, due));
            (Reply::Caller(reply), due)
        });
        let error = match outcome {
            Attempt::Delivered => return Inline::Delivered { attempts },
            Attempt::Gone => {
                table.unsubscribe(subscription.id);
                if attempts == 1 {
                    return Inline::Gone;
                }
                let error = gone_before_retry(attempts - 1, &last_error);
                return Inline::Failed(failure(subscription, error, attempts - 1));
            }
            Attempt::Failed(error) => {
                outbox.counts.handler_failures += 1;
                error
            }
            Attempt::Awaiting => {
                let Some((waiting, due)) = waiting else {
                    unreachable!("an acknowledged delivery has its reply")
                };
                let waited = {
                    let _counted = Counted::new(rules.awaiting);
                    let until = (due, rules.ack_timeout);
                    wait_for_outcome(subscription, &waiting, until, (&shutdown, rules.shutdown_begun))
                };
                let outcome = match waited {
                    Waited::Outcome(outcome) => outcome,
                    Waited::ShutDown(error) => {
                        ended_by_shutdown = true;
                        Err(error)
                    }
                };
                match outbox.outcome(outcome) {
                    None => return Inline::Delivered { attempts },
                    Some(error) => error,
                }
            }
        };
        if attempts > rules.retry.max_retries {
            if ended_by_shutdown {
                rules.at_shutdown.ended();
            }
            return Inline::Failed(failure(subscription, error, attempts));
        }
        last_error.clone_from(&error);
        let due = crate::deadline::from_now(rules.retry.delay_for_retry(attempts, fastrand::f64()));
        if !sleep_until(due, &shutdown, rules.shutdown_begun) {
            rules.at_shutdown.ended();
            return Inline::Failed(failure(subscription, shut_down_before_retry(attempts, &error), attempts));
        }
        if table.get(subscription.id).is_none() {
            // Unsubscribed while the retry waited: not made, as on a worker.
            let error = unsubscribed_before_retry(attempts, &error);
            return Inline::Failed(failure(subscription, error, attempts));
        }
        if shutdown().is_some() {
            rules.at_shutdown.retry_made();
        }
        outbox.retry_scheduled();
    }
}

/// The error of a delivery whose subscriber went away (a dropped receiver) while retry `retry`
/// waited, after `last_error`.
pub(crate) fn gone_before_retry(retry: u32, last_error: &str) -> String {
    format!("the subscriber went away before retry {retry} (last error: {last_error})")
}

/// The error of a delivery that shutdown ended while retry `retry` waited, after `last_error`.
pub(crate) fn shut_down_before_retry(retry: u32, last_error: &str) -> String {
    format!("the broker shut down before retry {retry} was due (last error: {last_error})")
}

/// The error of a delivery whose subscription ended while retry `retry` waited, after
/// `last_error`.
pub(crate) fn unsubscribed_before_retry(retry: u32, last_error: &str) -> String {
    format!("unsubscribed before retry {retry} was due (last error: {last_error})")
}

/// How a caller-thread wait for an acknowledged delivery's outcome ended.
enum Waited {
    /// The consumer settled it (or dropped it), or its time ran out.
    Outcome(Outcome),
    /// Shutdown stopped waiting for it; the error it fails with.
    ShutDown(String),
}

/// Waits for an acknowledged delivery's outcome on `waiting`, up to `due` (its deadline, `timeout`
/// after it was made): a delivery not settled by `shutdown()` fails. Looks every [`SLICE`]
/// whether the consumer went away, and wakes as soon as shutdown begins (`begun` disconnects).
fn wait_for_outcome(
    subscription: &Subscription,
    waiting: &flume::Receiver<(Outcome, Instant)>,
    (due, timeout): (Instant, Duration),
    (shutdown, begun): (&impl Fn() -> Option<Instant>, &flume::Receiver<()>),
) -> Waited {
    let timed_out = || Waited::Outcome(Err(format!("not acknowledged within {timeout:?}")));
    let settled = |(outcome, settled_at): (Outcome, Instant)| {
        if settled_at < due { Waited::Outcome(outcome) } else { timed_out() }
    };
    let dropped = || Waited::Outcome(Err(super::acked::DROPPED.to_owned()));
    loop {
        if let Target::Acked(channel) = &subscription.target {
            // A consumer gone with the delivery unread: it fails now, and comes on `waiting`.
            channel.abandoned();
        }
        // A settle counts by when it was made, however late this thread looks (as on a worker).
        match waiting.try_recv() {
            Ok(received) => return settled(received),
            Err(flume::TryRecvError::Disconnected) => return dropped(),
            Err(flume::TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        let stop = shutdown();
        if stop.is_some_and(|deadline| now >= deadline) {
            return Waited::ShutDown("the broker shut down before the delivery was acknowledged".to_owned());
        }
        if now >= due {
            return timed_out();
        }
        let until = stop.map_or(due, |stop| stop.min(due)).min(crate::deadline::after(now, SLICE));
        let received = if stop.is_some() {
            waiting.recv_deadline(until)
        } else {
            // Until shutdown begins: `begun` then disconnects, and the next look sees it.
            flume::Selector::new()
                .recv(waiting, |received| received.map_err(|_| flume::RecvTimeoutError::Disconnected))
                .recv(begun, |_| Err(flume::RecvTimeoutError::Timeout))
                .wait_deadline(until)
                .unwrap_or(Err(flume::RecvTimeoutError::Timeout))
        };
        match received {
            Ok(received) => return settled(received),
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => return dropped(),
        }
    }
}

/// How long a caller-thread wait for an acknowledgement waits before it looks again whether the
/// consumer went away.
const SLICE: Duration = Duration::from_millis(20);

/// Sleeps until `due`; `false` when `shutdown()` comes before `due`. Wakes as soon as shutdown
/// begins (`begun` disconnects) to see when it stops.
fn sleep_until(due: Instant, shutdown: &impl Fn() -> Option<Instant>, begun: &flume::Receiver<()>) -> bool {
    loop {
        let stop = shutdown();
        if stop.is_some_and(|deadline| due > deadline) {
            return false;
        }
        let now = Instant::now();
        if now >= due {
            return true;
        }
        if stop.is_some() {
            // Due before shutdown stops waiting: nothing else ends the sleep.
            std::thread::sleep(due - now);
        } else {
            // Nothing is sent on `begun`: this returns at `due`, or as shutdown begins.
            let _ = begun.recv_deadline(due);
        }
    }
}
