//! Acknowledged deliveries: events handed to a consumer that says when it is done with each
//! ([`Broker::subscribe_acked`](crate::Broker::subscribe_acked)).
//!
//! A handler's delivery ends when the handler returns; a stream's when the event is in its
//! channel. An acknowledged delivery ends when its consumer calls [`Delivery::ack`] or
//! [`Delivery::fail`], from any thread, sync or async, in any order: until then the event's job
//! stays open, as one waiting for a retry does. Its status is not yet final, `drain` waits for it,
//! another instance's event keeps its claim (the worker extends it, awake or idle) and is not
//! acknowledged to the provider, so an instance that dies with it unfinished gets it again. A
//! failure, a [`Delivery`] dropped unsettled, and a delivery not settled within the broker's
//! [`ack_timeout`](crate::BrokerBuilder::ack_timeout) are retried per the broker's policy and then
//! dead-lettered, as a handler's failure is.
//!
//! The channel ([`AckedChannel`]) keeps a receiver of the broker's own, never read but to empty
//! it: when the consumer's receivers are gone (a worker looks every [`SWEEP_EVERY`] while
//! deliveries wait, and before each delivery) or the subscription ends, what is left unread fails
//! at once instead of waiting for its timeout.
//!
//! The worker that made a delivery gets its outcome through its [`AckQueue`]: the consumer pushes
//! it there and wakes the worker if it sleeps; the worker takes what is queued at the start of
//! each turn. `publish_sync` and `redrive`, which deliver on the caller's thread, wait on a
//! channel of their own for it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_utils::CachePadded;

use crate::SubscriptionId;
use crate::dispatch::delivery::Job;
use crate::dispatch::ring::Nudge;
use crate::subscription::{Subscription, Target};
use crate::sync::{AtomicBool, Ordering};
use crate::{BoxError, Event};

/// The error of a delivery dropped without [`Delivery::ack`] or [`Delivery::fail`].
pub(crate) const DROPPED: &str = "the delivery was dropped without being acknowledged";

/// One event delivered to an acknowledged subscription, to be settled with [`Delivery::ack`] or
/// [`Delivery::fail`]. Dropping it unsettled fails it (it is then retried, as a failure is).
///
/// ```
/// use std::time::Duration;
/// use eventbroker::{Broker, Event, EventSource};
///
/// let broker = Broker::builder().build()?;
/// let (_id, deliveries) = broker.subscribe_acked("orders.>")?;
/// broker.publish(Event::new(EventSource::System, "orders.created"))?;
///
/// let delivery = deliveries.recv_timeout(Duration::from_secs(5))?;
/// assert_eq!(delivery.event().event_type, "orders.created");
/// assert_eq!(delivery.attempt(), 1);
/// delivery.ack(); // the event's status becomes `completed`
///
/// broker.drain(Duration::from_secs(5))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a delivery dropped unsettled counts as a failure; call `ack` or `fail`"]
pub struct Delivery {
    event: Arc<Event>,
    attempt: u32,
    deadline: Instant,
    /// Where the outcome goes; `None` once settled.
    reply: Option<Reply>,
}

impl Delivery {
    pub(crate) fn new(event: Arc<Event>, attempt: u32, reply: Reply, deadline: Instant) -> Self {
        Self { event, attempt, deadline, reply: Some(reply) }
    }

    /// The event.
    pub fn event(&self) -> &Arc<Event> {
        &self.event
    }

    /// Which attempt of this delivery this is: 1 for the first, 2 for the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the broker stops waiting for this delivery: the moment it was made plus the
    /// broker's [`ack_timeout`](crate::BrokerBuilder::ack_timeout). A settle after it is ignored,
    /// the delivery having been retried (as a new [`Delivery`]) or dead-lettered by then; so is one
    /// after a shutdown's deadline, which can come first.
    ///
    /// A delivery waits in its channel until the consumer reads it, and the time it waited there
    /// counts: a consumer that falls behind by more than the timeout receives deliveries that
    /// have already expired. Skipping those ([`Delivery::is_expired`]) saves doing work twice,
    /// once for the expired delivery and once for its retry:
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::{Broker, Event, EventSource};
    ///
    /// let broker = Broker::builder().ack_timeout(Duration::from_millis(200)).build()?;
    /// let (_id, deliveries) = broker.subscribe_acked("orders.>")?;
    /// broker.publish(Event::new(EventSource::System, "orders.created"))?;
    /// std::thread::sleep(Duration::from_millis(300)); // the consumer is busy elsewhere
    ///
    /// let late = deliveries.recv_timeout(Duration::from_secs(5))?;
    /// assert!(late.is_expired());
    /// drop(late); // its retry is on its way
    /// let retry = deliveries.recv_timeout(Duration::from_secs(5))?;
    /// assert_eq!(retry.attempt(), 2);
    /// retry.ack();
    /// broker.drain(Duration::from_secs(5))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether [`Delivery::deadline`] has passed: the broker no longer waits for this delivery,
    /// and settling it does nothing (a settle counts by when it is made, not by when the broker
    /// gets to it). A shutdown can end the wait sooner; see [`Delivery::ack`].
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The delivery succeeded. Does nothing when the broker stopped waiting for it (its
    /// [`ack_timeout`](crate::BrokerBuilder::ack_timeout) passed, or a shutdown ended the wait,
    /// which it does a little before its own deadline, so that what it ends is written by then):
    /// it was then retried as a new delivery, or dead-lettered.
    pub fn ack(mut self) {
        if let Some(reply) = self.reply.take() {
            reply.send(Ok(()));
        }
    }

    /// The delivery failed with `error`: it is retried per the broker's retry policy (as a new
    /// [`Delivery`] with the next [`attempt`](Delivery::attempt) number), then dead-lettered with
    /// this error, as a handler's failure is.
    pub fn fail(mut self, error: impl Into<BoxError>) {
        if let Some(reply) = self.reply.take() {
            reply.send(Err(error.into().to_string()));
        }
    }

    /// Settles nothing: for a delivery the broker made and takes back (its channel was full or
    /// gone), whose outcome the broker knows without it.
    pub(crate) fn defuse(mut self) {
        self.reply = None;
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            reply.send(Err(DROPPED.to_owned()));
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event.id)
            .field("type", &self.event.event_type)
            .field("attempt", &self.attempt)
            .field("deadline", &self.deadline)
            .field("settled", &self.reply.is_none())
            .finish()
    }
}

/// The channel of an acknowledged subscription, as the broker holds it.
pub(crate) struct AckedChannel {
    /// `None` once the subscription ended: the consumer's receivers then disconnect as soon as
    /// they have read what is left (nothing: see `close`), even while a worker's match cache
    /// still holds the subscription.
    sender: ArcSwapOption<flume::Sender<Delivery>>,
    /// A receiver of the broker's own, never read but to empty the channel once the consumer's
    /// receivers are gone, or the subscription ended: its deliveries then fail at once, rather
    /// than wait for their timeout in a channel nobody reads.
    own: flume::Receiver<Delivery>,
    capacity: usize,
}

/// How handing a delivery to an acknowledged subscription's channel went.
pub(crate) enum Handed {
    Queued,
    /// The channel holds its capacity; the delivery is taken back.
    Full,
    /// The consumer is gone, or the subscription ended.
    Gone,
}

impl AckedChannel {
    /// A channel of `capacity` deliveries (at least 1), and the consumer's receiver.
    pub(crate) fn new(capacity: usize) -> (Self, flume::Receiver<Delivery>) {
        let capacity = capacity.max(1);
        let (sender, receiver) = flume::bounded(capacity);
        let channel = Self { sender: ArcSwapOption::from_pointee(sender), own: receiver.clone(), capacity };
        (channel, receiver)
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Hands `delivery` to the consumer.
    pub(crate) fn send(&self, delivery: Delivery) -> Handed {
        let sender = self.sender.load();
        let sender = match sender.as_deref() {
            Some(sender) if self.own.receiver_count() > 1 => sender,
            // Open, so its receivers are gone; or ended.
            sender => {
                self.fail_unread(sender.is_some());
                delivery.defuse();
                return Handed::Gone;
            }
        };
        match sender.try_send(delivery) {
            Ok(()) => Handed::Queued,
            Err(flume::TrySendError::Full(delivery)) => {
                delivery.defuse();
                Handed::Full
            }
            Err(flume::TrySendError::Disconnected(delivery)) => {
                delivery.defuse();
                Handed::Gone
            }
        }
    }

    /// Whether the consumer dropped every receiver it had (only `own` is left of them).
    pub(crate) fn consumer_gone(&self) -> bool {
        self.own.receiver_count() <= 1
    }

    /// Whether the consumer is gone (only `own` is left of the channel's receivers) or the
    /// subscription ended. Then what is left unread fails now, rather than at its timeout.
    pub(crate) fn abandoned(&self) -> bool {
        let consumer_gone = self.consumer_gone();
        if consumer_gone || self.sender.load().is_none() {
            self.fail_unread(consumer_gone);
            return true;
        }
        false
    }

    /// Fails what is left unread in the channel: its consumer is gone, or (`false`) the
    /// subscription ended.
    fn fail_unread(&self, consumer_gone: bool) {
        let error = if consumer_gone {
            "the consumer's receiver was dropped with the delivery unread"
        } else {
            "the subscription ended with the delivery unread"
        };
        for unread in self.own.drain() {
            unread.fail(error);
        }
    }

    /// The subscription ended: the consumer's receivers disconnect, and what they left unread
    /// fails (each is dead-lettered, its subscription gone).
    pub(crate) fn close(&self) {
        self.sender.store(None);
        self.abandoned();
    }
}

/// How often a worker with deliveries waiting looks whether their consumers are still there.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// A delivery made by a worker: its token, and its deadline.
pub(crate) type Made = (u64, Instant);

/// How a delivery ended, as its consumer reported it.
pub(crate) type Outcome = Result<(), String>;

/// Where a [`Delivery`]'s outcome goes.
pub(crate) enum Reply {
    /// To the worker that made it, which knows it by `token`.
    Worker { queue: Arc<AckQueue>, token: u64 },
    /// To the caller's thread waiting on the other end (`publish_sync`, `redrive`), with when it
    /// came; nobody, once it stopped waiting.
    Caller(flume::Sender<(Outcome, Instant)>),
}

impl Reply {
    fn send(self, outcome: Outcome) {
        match self {
            Self::Worker { queue, token } => queue.push(token, outcome),
            Self::Caller(waiting) => {
                // A full or closed channel: the caller stopped waiting (or has this outcome).
                let _ = waiting.try_send((outcome, Instant::now()));
            }
        }
    }
}

/// Outcomes of one worker's deliveries, as their consumers settle them.
pub(crate) struct AckQueue {
    /// Set after an outcome is queued, cleared by the worker before it takes them: while set, the
    /// worker does not sleep. A line of its own: consumers write it, the worker reads it each turn.
    ready: CachePadded<AtomicBool>,
    outcomes: parking_lot::Mutex<Vec<Settled>>,
    nudge: Nudge<Option<Job>>,
}

/// An outcome as its consumer settled it: the delivery's token, the outcome, and when it came
/// (a settle after the delivery's deadline is ignored, however soon the worker looks).
type Settled = (u64, Outcome, Instant);

impl AckQueue {
    pub(crate) fn new(nudge: Nudge<Option<Job>>) -> Self {
        Self {
            ready: CachePadded::new(AtomicBool::new(false)),
            outcomes: parking_lot::Mutex::new(Vec::new()),
            nudge,
        }
    }

    fn push(&self, token: u64, outcome: Outcome) {
        // Stamped under the lock: an outcome stamped before a worker's `now` is in the queue by
        // the time the worker's `take` gets the lock (see `Awaiting::settle`).
        {
            let mut outcomes = self.outcomes.lock();
            outcomes.push((token, outcome, Instant::now()));
        }
        // Release: pairs with the AcqRel swap in `take`; the outcome pushed above is there to take.
        self.ready.store(true, Ordering::Release);
        // After the store: the worker's last look before it parks sees it, or the nudge sees the
        // worker sleeping (see `Nudge::wake`).
        self.nudge.wake();
    }

    /// Whether outcomes wait (the worker's look before it sleeps).
    pub(crate) fn has_outcomes(&self) -> bool {
        // Relaxed: in the park handshake the SeqCst fences order it; else a peek, and `take`
        // looks again.
        self.ready.load(Ordering::Relaxed)
    }

    /// Moves the queued outcomes onto `into`: when `ready` says some wait, or `always` (an
    /// outcome pushed and not yet flagged is taken too).
    fn take(&self, into: &mut Vec<Settled>, always: bool) {
        // AcqRel: the clear happens before the lock below (an outcome queued after the clear sets
        // `ready` again, for the next turn), and pairs with the Release store in `push`.
        if self.ready.swap(false, Ordering::AcqRel) || always {
            into.append(&mut self.outcomes.lock());
        }
    }
}

/// A worker's deliveries waiting for their outcome.
pub(crate) struct Awaiting {
    queue: Arc<AckQueue>,
    timeout: Duration,
    next_token: u64,
    /// The deadline of the delivery [`Awaiting::reply`] made last.
    last_deadline: Instant,
    /// By token, which grows with the time each was made: the first entry has the earliest
    /// deadline.
    open: BTreeMap<u64, Awaited>,
    /// The subscriptions of `open`'s deliveries, with how many each has there: those
    /// [`Awaiting::sweep`] looks at.
    subscriptions: HashMap<SubscriptionId, (Arc<Subscription>, usize)>,
    /// When [`Awaiting::sweep`] next looks.
    next_sweep: Instant,
    taken: Vec<Settled>,
}

/// One delivery waiting for its outcome.
pub(crate) struct Awaited {
    /// Its job's key among the worker's open jobs.
    pub(crate) job: usize,
    pub(crate) subscription: Arc<Subscription>,
    /// The attempt it is.
    pub(crate) attempts: u32,
    deadline: Instant,
}

impl Awaiting {
    pub(crate) fn new(queue: Arc<AckQueue>, timeout: Duration) -> Self {
        Self {
            queue,
            timeout,
            next_token: 0,
            last_deadline: Instant::now(),
            open: BTreeMap::new(),
            subscriptions: HashMap::new(),
            next_sweep: Instant::now(),
            taken: Vec::new(),
        }
    }

    /// The reply of a new delivery made now, and its deadline; [`Awaiting::last`] has its token.
    pub(crate) fn reply(&mut self) -> (Reply, Instant) {
        self.next_token += 1;
        self.last_deadline = crate::deadline::from_now(self.timeout);
        (Reply::Worker { queue: Arc::clone(&self.queue), token: self.next_token }, self.last_deadline)
    }

    /// The token and deadline of the reply [`Awaiting::reply`] made last.
    pub(crate) fn last(&self) -> Made {
        (self.next_token, self.last_deadline)
    }

    /// Waits, until `deadline`, for the outcome of the delivery `token`, the `attempts`-th to
    /// `subscription` of open job `job`.
    pub(crate) fn insert(
        &mut self,
        (token, deadline): Made,
        job: usize,
        subscription: Arc<Subscription>,
        attempts: u32,
    ) {
        let counted =
            self.subscriptions.entry(subscription.id).or_insert_with(|| (Arc::clone(&subscription), 0));
        counted.1 += 1;
        self.open.insert(token, Awaited { job, subscription, attempts, deadline });
    }

    /// Takes delivery `token` out of those waiting, if it still waits.
    fn remove(&mut self, token: u64) -> Option<Awaited> {
        let awaited = self.open.remove(&token)?;
        self.uncount(&awaited);
        Some(awaited)
    }

    fn uncount(&mut self, awaited: &Awaited) {
        let id = awaited.subscription.id;
        if let Some(counted) = self.subscriptions.get_mut(&id) {
            counted.1 -= 1;
            if counted.1 == 0 {
                self.subscriptions.remove(&id);
            }
        }
    }

    /// When the earliest delivery waiting times out, or the next sweep is due, whichever comes
    /// first; `None` when none waits.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        self.next_deadline().map(|deadline| deadline.min(self.next_sweep))
    }

    /// Every [`SWEEP_EVERY`] while deliveries wait: fails the unread deliveries of consumers that
    /// are gone (their receivers dropped), so that they are retried, and then dead-lettered, now
    /// rather than at their timeout; pushes those subscriptions onto `gone`, to end.
    pub(crate) fn sweep(&mut self, gone: &mut Vec<SubscriptionId>) {
        if self.open.is_empty() {
            return;
        }
        let now = Instant::now();
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = crate::deadline::after(now, SWEEP_EVERY);
        for (id, (subscription, _)) in &self.subscriptions {
            if let Target::Acked(channel) = &subscription.target
                && channel.abandoned()
            {
                gone.push(*id);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Whether outcomes are queued (see [`AckQueue::has_outcomes`]).
    pub(crate) fn has_outcomes(&self) -> bool {
        self.queue.has_outcomes()
    }

    /// When the earliest delivery waiting times out.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.open.first_key_value().map(|(_, awaited)| awaited.deadline)
    }

    /// Moves onto `into` the deliveries whose outcome came, with it, then those that timed out,
    /// with a timeout error: a delivery settled at or after its deadline timed out too, however
    /// soon this looks (a busy worker may look late), as [`Delivery::is_expired`] told its
    /// consumer. Outcomes of deliveries no longer waiting (timed out, or given up at shutdown)
    /// are dropped. Costs one load when nothing waits.
    pub(crate) fn settle(&mut self, into: &mut Vec<(Awaited, Outcome)>) {
        // Read before the outcomes are taken, under the queue's lock, where each is stamped: a
        // settle made before `now` is among them, even one not yet flagged, so no delivery times
        // out below whose consumer settled it in time.
        let now = (!self.open.is_empty()).then(Instant::now);
        let expiring = now.is_some_and(|now| self.next_deadline().is_some_and(|first| first <= now));
        if expiring || self.queue.has_outcomes() {
            self.queue.take(&mut self.taken, expiring);
            let mut taken = std::mem::take(&mut self.taken);
            for (token, outcome, settled_at) in taken.drain(..) {
                if let Some(awaited) = self.remove(token) {
                    let outcome = if settled_at < awaited.deadline { outcome } else { Err(self.timed_out()) };
                    into.push((awaited, outcome));
                }
            }
            self.taken = taken;
        }
        let Some(now) = now else { return };
        while let Some(entry) = self.open.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            let awaited = entry.remove();
            self.uncount(&awaited);
            into.push((awaited, Err(self.timed_out())));
        }
    }

    /// The error of a delivery not settled by its deadline.
    fn timed_out(&self) -> String {
        format!("not acknowledged within {:?}", self.timeout)
    }

    /// Removes every delivery still waiting, in the order they were made.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Awaited> + use<> {
        self.subscriptions.clear();
        std::mem::take(&mut self.open).into_values()
    }
}

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{AckQueue, Awaiting, Reply};
    use crate::dispatch::ring::ring;
    use crate::subscription::{Subscription, Target};
    use crate::{Pattern, SubscriptionId};

    /// A consumer settles just before its delivery's deadline, and the worker looks just after it,
    /// while the settle is queued but not yet flagged: the settle counts, the delivery does not
    /// time out.
    #[test]
    fn a_settle_made_in_time_counts_however_late_the_worker_looks() {
        let (_producer, consumer) = ring::<Option<crate::dispatch::delivery::Job>>(2);
        let queue = Arc::new(AckQueue::new(consumer.nudge()));
        let mut awaiting = Awaiting::new(Arc::clone(&queue), Duration::from_millis(20));
        let (reply, _deadline) = awaiting.reply();
        let subscription = Arc::new(Subscription {
            id: SubscriptionId(1),
            pattern: Pattern::parse("a.b").unwrap(),
            target: Target::Handler(Box::new(|_| Ok(()))),
        });
        awaiting.insert(awaiting.last(), 0, subscription, 1);
        let Reply::Worker { token, .. } = reply else { unreachable!() };
        // Pushed as `AckQueue::push` does, up to the flag it sets afterwards.
        queue.outcomes.lock().push((token, Ok(()), Instant::now()));
        std::thread::sleep(Duration::from_millis(30));

        let mut settled = Vec::new();
        awaiting.settle(&mut settled);
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].1, Ok(()), "settled before its deadline");
        assert!(awaiting.is_empty());
    }
}
