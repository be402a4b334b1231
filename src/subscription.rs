//! Subscriptions: who receives which events.

use std::fmt;

/// Identifies one subscription of one broker. Ids increase in subscription order, which is the
/// order handlers run in. Each broker draws its own random range of ids when it is built, so an
/// id read back from a dead letter names the subscription of the broker (and of the run of it)
/// that wrote the letter, never another broker's, or the same service's after a restart, that
/// happens to have subscribed as many times.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SubscriptionId(pub(crate) u64);

impl SubscriptionId {
    /// The id as a number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// An id from a number, as read back from a dead letter or a log.
    pub const fn from_raw(id: u64) -> Self {
        Self(id)
    }
}

/// Bits of an id that count a broker's subscriptions; those above are its random range.
const COUNT_BITS: u32 = 40;

impl SubscriptionId {
    /// The first id of a new broker: a random range (never zero, the id of no subscription), then
    /// a count from 1.
    fn first_of_a_range() -> Self {
        let range = fastrand::u64(1..1 << (64 - COUNT_BITS));
        Self(range << COUNT_BITS | 1)
    }
}

impl fmt::Display for SubscriptionId {
    /// `sub-N.RANGE`: the broker's count of subscriptions at this one, then its range in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0 & ((1 << COUNT_BITS) - 1);
        match self.0 >> COUNT_BITS {
            0 => write!(f, "sub-{count}"),
            range => write!(f, "sub-{count}.{range:x}"),
        }
    }
}

impl fmt::Debug for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubscriptionId({})", self.0)
    }
}

/// What a handler reports when a delivery does not succeed.
#[derive(Debug)]
pub(crate) enum DeliveryError {
    /// The handler failed (or panicked); the delivery may be retried.
    Failed(String),
    /// The subscriber is gone (a stream whose receiver was dropped); the subscription ends.
    Gone,
}

/// The handler as the broker stores it: user closures are wrapped to this shape.
pub(crate) type Handler = dyn Fn(&std::sync::Arc<crate::Event>) -> Result<(), DeliveryError> + Send + Sync;

/// What a subscription delivers to.
pub(crate) enum Target {
    /// A handler, whose return ends the delivery.
    Handler(Box<Handler>),
    /// A channel of events, whose delivery ends once the event is in it.
    Stream(StreamChannel),
    /// A channel of [`Delivery`](crate::Delivery) values, each ended when its consumer settles it
    /// (see [`crate::dispatch::acked`]).
    Acked(crate::dispatch::acked::AckedChannel),
}

/// One subscription: its pattern and what it delivers to. Shared by every snapshot that holds it.
pub(crate) struct Subscription {
    pub(crate) id: SubscriptionId,
    pub(crate) pattern: crate::Pattern,
    pub(crate) target: Target,
}

/// The channel of a stream subscription ([`Broker::subscribe_stream`](crate::Broker::subscribe_stream)),
/// as the broker holds it.
pub(crate) struct StreamChannel {
    /// `None` once the subscription ended: the consumer's receivers then disconnect as soon as
    /// they have read what is left, even while a worker's match cache still holds the
    /// subscription.
    sender: arc_swap::ArcSwapOption<flume::Sender<std::sync::Arc<crate::Event>>>,
    capacity: usize,
}

impl StreamChannel {
    /// A channel of `capacity` events (at least 1), and the consumer's receiver.
    pub(crate) fn new(capacity: usize) -> (Self, flume::Receiver<std::sync::Arc<crate::Event>>) {
        let capacity = capacity.max(1);
        let (sender, receiver) = flume::bounded(capacity);
        (Self { sender: arc_swap::ArcSwapOption::from_pointee(sender), capacity }, receiver)
    }

    /// Puts `event` in the channel: a full channel is a failed delivery, a channel whose
    /// receivers are gone (or whose subscription ended) a subscriber gone.
    pub(crate) fn send(&self, event: &std::sync::Arc<crate::Event>) -> Result<(), DeliveryError> {
        let Some(sender) = &*self.sender.load() else { return Err(DeliveryError::Gone) };
        match sender.try_send(std::sync::Arc::clone(event)) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Full(_)) => {
                Err(DeliveryError::Failed(format!("stream receiver is full ({} events)", self.capacity)))
            }
            Err(flume::TrySendError::Disconnected(_)) => Err(DeliveryError::Gone),
        }
    }

    fn close(&self) {
        self.sender.store(None);
    }

    /// Whether every receiver was dropped (or the subscription ended).
    fn abandoned(&self) -> bool {
        self.sender.load().as_ref().is_none_or(|sender| sender.receiver_count() == 0)
    }
}

impl Target {
    /// Whether it is a channel whose consumer dropped every receiver: nobody can take its events.
    fn abandoned(&self) -> bool {
        match self {
            Self::Handler(_) => false,
            Self::Stream(channel) => channel.abandoned(),
            Self::Acked(channel) => channel.consumer_gone(),
        }
    }
}

impl Subscription {
    /// It was unsubscribed: a channel's receivers disconnect now (once they have read what it
    /// holds), not when the last snapshot or match cache holding the subscription lets go of it.
    /// Called outside the table's lock: what it fails may be dropped, and drops may take it.
    fn end(&self) {
        match &self.target {
            Target::Acked(channel) => channel.close(),
            Target::Stream(channel) => channel.close(),
            Target::Handler(_) => {}
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("pattern", &self.pattern)
            .finish_non_exhaustive()
    }
}

/// The compiled subscriptions readers match against.
pub(crate) type SubscriptionSet = crate::PatternSet<std::sync::Arc<Subscription>>;

/// Every subscription of a broker.
///
/// Readers (workers, `publish_sync`) load the current [`SubscriptionSet`] with one lock-free
/// atomic load and match against it. Writers (`subscribe`, `unsubscribe`) serialise on a mutex,
/// derive the next set from the master copy — path copying, so only the nodes on the pattern's
/// path are copied — and publish it with one atomic store.
///
/// Guarantee: an event published after `unsubscribe` returns is never delivered to that
/// subscription; events already in flight may still be. Likewise an event published after
/// `subscribe` returns is delivered to the new subscription if it matches.
pub(crate) struct SubscriptionTable {
    current: crate::sync::ArcCell<SubscriptionSet>,
    master: parking_lot::Mutex<Master>,
    /// The patterns of subscriptions ended in the last [`REMOVED_WINDOW`], oldest first, with
    /// when (see [`SubscriptionTable::recently_wanted`]).
    removed: parking_lot::Mutex<std::collections::VecDeque<(crate::Pattern, std::time::Instant)>>,
    /// Whether `removed` holds any; written under its lock, looked at by workers without it.
    any_removed: crate::sync::AtomicBool,
}

/// How long after a subscription ends an event from another instance may still arrive that was
/// fetched for it: a fetch in flight when it ended, placed after.
const REMOVED_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

struct Master {
    set: SubscriptionSet,
    entries: std::collections::HashMap<SubscriptionId, (std::sync::Arc<Subscription>, crate::EntryId)>,
    next_id: u64,
}

impl SubscriptionTable {
    pub(crate) fn new() -> Self {
        Self {
            current: crate::sync::ArcCell::new(crate::sync::Arc::new(SubscriptionSet::new())),
            master: parking_lot::Mutex::new(Master {
                set: SubscriptionSet::new(),
                entries: std::collections::HashMap::new(),
                next_id: SubscriptionId::first_of_a_range().0,
            }),
            removed: parking_lot::Mutex::new(std::collections::VecDeque::new()),
            any_removed: crate::sync::AtomicBool::new(false),
        }
    }

    /// The current set; lock-free.
    pub(crate) fn load(&self) -> crate::sync::Arc<SubscriptionSet> {
        self.current.load()
    }

    pub(crate) fn subscribe(&self, pattern: crate::Pattern, target: Target) -> SubscriptionId {
        let mut master = self.master.lock();
        let id = SubscriptionId(master.next_id);
        master.next_id += 1;
        let subscription = std::sync::Arc::new(Subscription { id, pattern, target });
        let entry = master.set.insert(&subscription.pattern, std::sync::Arc::clone(&subscription));
        master.entries.insert(id, (subscription, entry));
        // Release (inside ArcCell::store): a reader that loads the new set sees the subscription.
        self.current.store(crate::sync::Arc::new(master.set.clone()));
        id
    }

    /// Removes `id`; `false` when there is no such subscription (any more).
    pub(crate) fn unsubscribe(&self, id: SubscriptionId) -> bool {
        let mut master = self.master.lock();
        let Some((subscription, entry)) = master.entries.remove(&id) else { return false };
        master.set.remove(&subscription.pattern, entry);
        self.current.store(crate::sync::Arc::new(master.set.clone()));
        drop(master);
        let mut removed = self.removed.lock();
        removed.push_back((subscription.pattern.clone(), std::time::Instant::now()));
        // Release: pairs with the Acquire load in `recently_wanted` (the lock orders the rest).
        self.any_removed.store(true, crate::sync::Ordering::Release);
        drop(removed);
        subscription.end();
        true
    }

    /// Whether a subscription that ended in the last [`REMOVED_WINDOW`] matched `event_type`:
    /// then an event from another instance of that type may have been fetched for it, and a
    /// work-queue member gives it back to its group rather than count it handled. One load while
    /// no subscription ended lately.
    pub(crate) fn recently_wanted(&self, event_type: &str) -> bool {
        // Acquire: see `unsubscribe`. A stale `false` just after an unsubscribe counts one event
        // handled, as before the window existed.
        if !self.any_removed.load(crate::sync::Ordering::Acquire) {
            return false;
        }
        let mut removed = self.removed.lock();
        let now = std::time::Instant::now();
        while removed.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) > REMOVED_WINDOW) {
            removed.pop_front();
        }
        if removed.is_empty() {
            self.any_removed.store(false, crate::sync::Ordering::Relaxed);
            return false;
        }
        removed.iter().any(|(pattern, _)| pattern.matches(event_type))
    }

    /// The live subscription with this id.
    pub(crate) fn get(&self, id: SubscriptionId) -> Option<std::sync::Arc<Subscription>> {
        self.master.lock().entries.get(&id).map(|(s, _)| std::sync::Arc::clone(s))
    }

    /// Live subscriptions whose pattern is exactly `pattern`, in subscription order.
    pub(crate) fn live_with_pattern(&self, pattern: &str) -> Vec<std::sync::Arc<Subscription>> {
        let master = self.master.lock();
        let mut found: Vec<_> = master
            .entries
            .values()
            .filter(|(s, _)| s.pattern.as_str() == pattern)
            .map(|(s, _)| std::sync::Arc::clone(s))
            .collect();
        found.sort_by_key(|s| s.id);
        found
    }

    pub(crate) fn len(&self) -> usize {
        self.master.lock().entries.len()
    }

    /// Ends the subscriptions whose channel's consumer dropped every receiver (streams and
    /// acknowledged channels), and returns how many. Otherwise each ends only when a matching event
    /// finds it gone, and until then stays in the filter other instances' events are fetched by.
    pub(crate) fn end_abandoned(&self) -> usize {
        let abandoned: Vec<SubscriptionId> = {
            let master = self.master.lock();
            master.entries.iter().filter(|(_, (s, _))| s.target.abandoned()).map(|(id, _)| *id).collect()
        };
        abandoned.into_iter().filter(|id| self.unsubscribe(*id)).count()
    }

    /// The distinct patterns of the live subscriptions, and the generation of the set they are
    /// from: what an inbound source is told to filter by.
    pub(crate) fn patterns(&self) -> (Vec<crate::Pattern>, u64) {
        let master = self.master.lock();
        let mut patterns: Vec<crate::Pattern> =
            master.entries.values().map(|(s, _)| s.pattern.clone()).collect();
        patterns.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        patterns.dedup_by(|a, b| a.as_str() == b.as_str());
        (patterns, master.set.generation())
    }

    /// Ends every subscription, dropping the handlers (and what they captured) now.
    pub(crate) fn clear(&self) {
        let mut master = self.master.lock();
        let removed = std::mem::take(&mut master.entries);
        for (subscription, entry) in removed.values() {
            master.set.remove(&subscription.pattern, *entry);
        }
        self.current.store(crate::sync::Arc::new(master.set.clone()));
        drop(master);
        for (subscription, _) in removed.values() {
            subscription.end();
        }
        drop(removed); // Handlers are dropped outside the lock: their drops may take it.
    }
}
