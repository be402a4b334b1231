//! The inbound thread: other instances' events, fetched from the provider's [`Inbound`] source and
//! placed into the shards like local ones.
//!
//! One named thread per broker (`eb-in-<instance id>`) loops: push the subscription patterns to the
//! source when they changed (having ended, once a second while it holds no event, the subscriptions
//! whose channel's receivers were all dropped), ask for as many events as the shards have free
//! slots and the broker's prefetch leaves room for (at most [`FETCH_MAX`]), wait for them up to
//! [`FETCH_WAIT`], and place each into its partition's shard, waiting for room there if need be.
//! Nothing is buffered beyond the one batch being placed, so a slow broker leaves events on the
//! server: backpressure reaches the provider. Each event travels with its ack token; the worker
//! that handles it settles it, and the writer acknowledges it after its dead letters (see
//! [`writer`](super::writer)).
//!
//! A fetch error does not stop anything: local dispatch goes on, and fetching resumes with backoff
//! (10 ms doubling to 1 s). At shutdown the thread stops fetching first and gives back (`nak`)
//! whatever it fetched and could not place, so another member or the next incarnation gets it.
//!
//! ## When fetching starts
//! A group's events that match none of the broker's patterns are passed over for good (the filter
//! keeps them from being handed out, and the group moves past them). So the thread fetches nothing
//! while the broker has no subscription: an instance that has not subscribed yet, or that dropped
//! every subscription, leaves its group's events where they are, for its later subscriptions or,
//! in a work queue, for the other members. And its first fetch waits until the subscriptions have
//! not changed for [`SETTLE`] (at most [`SETTLE_MAX`] after the first): a service that subscribes
//! its handlers one after another at start-up has them all in the filter before the backlog its
//! group kept while it was down is fetched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::dispatch::delivery::{Job, Origin, Outbox, dead_letter};
use crate::error::{DeliveryFailure, ProviderErrorKind};
use crate::provider::{AckToken, Inbound, InboundEvent};
use crate::subscription::SubscriptionTable;
use crate::{SubscriptionId, validate_event_type};

/// Most events one fetch asks for.
pub(crate) const FETCH_MAX: usize = 256;
/// How long one fetch waits for the first event; also how soon a shutdown is noticed.
pub(crate) const FETCH_WAIT: Duration = Duration::from_millis(100);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long the subscriptions stay unchanged before the first fetch (see the module docs): long
/// enough that a thread subscribing its handlers one after another on a loaded machine, descheduled
/// between two of them, is not taken for done.
pub(crate) const SETTLE: Duration = Duration::from_millis(200);
/// The longest the first fetch waits for the subscriptions to settle, from the first of them.
pub(crate) const SETTLE_MAX: Duration = Duration::from_secs(2);
/// How often the thread looks at the subscriptions while it waits for them.
const SUBSCRIPTIONS_POLL: Duration = Duration::from_millis(5);
/// How often the thread ends subscriptions whose channel's receivers were all dropped, so that
/// their patterns leave the filter without waiting for a matching event to find them gone.
const ABANDONED_SWEEP: Duration = Duration::from_secs(1);
/// The longest the thread waits, holding its prefetch, for the workers to end a job; they wake it
/// when they do, so this only bounds how late it notices a shutdown.
const HELD_WAIT: Duration = Duration::from_millis(5);

/// The inbound jobs the workers ended (acknowledged or given back), counted by the workers; the
/// inbound thread, holding its whole prefetch, waits for the count to move, and the worker that
/// moves it wakes the thread.
#[derive(Default)]
pub(crate) struct Ends {
    count: AtomicU64,
    /// Set by the inbound thread while it waits.
    waiting: AtomicBool,
    /// The inbound thread, set by its first wait.
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Ends {
    /// Counts `n` more jobs ended, waking the inbound thread if it waits.
    pub(crate) fn add(&self, n: u64) {
        // SeqCst, the count's add and the flag's load here, the flag's store and the count's load
        // in `wait_past`: of the two orders, one sees the other's first step, so either this
        // wakes the thread or the thread sees the new count and does not sleep.
        self.count.fetch_add(n, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst)
            && self.waiting.swap(false, Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
    }

    /// The jobs ended so far.
    pub(crate) fn get(&self) -> u64 {
        // Relaxed: a count the inbound thread reads to pace its fetches; `wait_past` orders its
        // own read.
        self.count.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` while the count is still `seen`. On the inbound thread only.
    pub(crate) fn wait_past(&self, seen: u64, timeout: Duration) {
        let _ = self.thread.set(std::thread::current());
        self.waiting.store(true, Ordering::SeqCst);
        if self.count.load(Ordering::SeqCst) == seen {
            // A wake-up left from an earlier wait returns at once: the caller looks again.
            std::thread::park_timeout(timeout);
        }
        self.waiting.store(false, Ordering::Relaxed);
    }
}

/// What the inbound thread feeds: the broker's shards.
pub(crate) trait Target: Send + Sync + 'static {
    /// Free ring slots over every shard (a snapshot).
    fn room(&self) -> usize;

    /// Places `job` into its shard, waiting up to `patience` for room; the job back when there was
    /// none, or when the broker is closed (`closed` then).
    fn place(&self, job: Job, patience: Duration) -> Result<(), (Job, bool)>;

    /// The subscription table the filter is derived from.
    fn table(&self) -> &SubscriptionTable;

    /// Inbound jobs the workers ended so far (acknowledged or given back).
    fn inbound_ended(&self) -> u64;

    /// Waits up to `timeout` while [`inbound_ended`](Self::inbound_ended) is still `seen`.
    fn wait_for_ends(&self, seen: u64, timeout: Duration);

    /// Hands dead letters and acknowledgements to the writer.
    fn settle(&self, outbox: &mut Outbox);

    /// Notes that the events of `tokens`, fetched, are about to be placed: held until a worker
    /// ends them (kept only where held events' claims are extended, in a work queue).
    fn hold(&self, tokens: impl IntoIterator<Item = AckToken>);

    /// Forgets `tokens`, given back without being placed.
    fn release(&self, tokens: &[AckToken]);

    /// The tokens of the inbound events held now, whose claims the thread extends.
    fn held_tokens(&self) -> Vec<AckToken>;
}

/// Counts of the inbound thread, for [`BrokerStats`](crate::BrokerStats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboundStats {
    /// Events fetched from other instances and placed into the shards.
    pub fetched: u64,
    /// Fetches that failed (each retried with backoff).
    pub fetch_errors: u64,
    /// Filter pushes that failed (retried on the next loop).
    pub filter_errors: u64,
    /// Fetched events whose type is invalid: dead-lettered and acknowledged, never handled.
    pub invalid: u64,
    /// Fetched events given back at shutdown, unplaced.
    pub returned: u64,
    /// Events this broker's group lost before any member was handed them (see [`Inbound::lost`]):
    /// with the memory provider's bus, those its log dropped at the bound while the group lagged
    /// behind; with Redis, those trimmed from the stream before the group read them; 0 for backends
    /// that do not count them. A broker fetches nothing while it has no subscription, so one that
    /// only publishes counts, past the bound, what the others publish: it would have received them
    /// had it subscribed then.
    pub lost: u64,
    /// How long before its fetch the oldest event of the last non-empty fetch was created (by its
    /// publisher's clock); zero after a fetch that found nothing, when this instance has caught
    /// up. How far behind the other instances this one runs. While fetches fail (the server
    /// down, say), the time since the last fetch that succeeded is added, and the lag grows until
    /// one succeeds again: an outage never reads as caught up.
    pub lag: Duration,
}

struct Counters {
    fetched: AtomicU64,
    fetch_errors: AtomicU64,
    filter_errors: AtomicU64,
    invalid: AtomicU64,
    returned: AtomicU64,
    /// `InboundStats::lag` as of the last fetch that succeeded, in microseconds.
    lag_micros: AtomicU64,
    /// When the last fetch succeeded, in microseconds since `since`.
    fetched_at_micros: AtomicU64,
    /// Whether the last fetch failed: the lag then grows from `fetched_at_micros`.
    failing: AtomicBool,
    /// The origin of `fetched_at_micros`.
    since: Instant,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            fetched: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            filter_errors: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            lag_micros: AtomicU64::new(0),
            fetched_at_micros: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            since: Instant::now(),
        }
    }
}

impl Counters {
    fn micros_since_start(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.since).as_micros()).unwrap_or(u64::MAX)
    }

    /// `InboundStats::lag` at `now`.
    fn lag(&self, now: Instant) -> Duration {
        // Relaxed: statistics. A reader between a fetch's two stores sees the old lag, or the
        // new one grown by at most one fetch's time.
        let lag = Duration::from_micros(self.lag_micros.load(Ordering::Relaxed));
        if !self.failing.load(Ordering::Relaxed) {
            return lag;
        }
        let fetched_at = self.fetched_at_micros.load(Ordering::Relaxed);
        lag.saturating_add(Duration::from_micros(self.micros_since_start(now).saturating_sub(fetched_at)))
    }
}

/// A broker's inbound source and the thread that drains it.
pub(crate) struct InboundPump {
    source: Arc<dyn Inbound>,
    /// Most inbound events the broker holds at once (see `BrokerBuilder::prefetch`).
    prefetch: usize,
    /// How often the claims of the events held are extended (a third of the claim idle time).
    extend_every: Duration,
    stop: AtomicBool,
    /// Set by shutdown once the workers ended (or it gave up on them at its deadline): the thread,
    /// stopped, extends the claims of the events the shards held until then.
    drained: AtomicBool,
    /// Generation of the subscription set last pushed as the filter; `u64::MAX` before the first.
    pushed: parking_lot::Mutex<u64>,
    counters: Counters,
    thread: parking_lot::Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
    /// What must live as long as the thread (see [`keep_until_exit`](Self::keep_until_exit)),
    /// and whether the thread runs.
    kept: parking_lot::Mutex<(Vec<Box<dyn Send>>, bool)>,
}

impl InboundPump {
    pub(crate) fn new(source: Arc<dyn Inbound>, prefetch: usize, extend_every: Duration) -> Self {
        Self {
            source,
            prefetch,
            extend_every,
            stop: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            pushed: parking_lot::Mutex::new(u64::MAX),
            counters: Counters::default(),
            thread: parking_lot::Mutex::new(None),
            kept: parking_lot::Mutex::new((Vec::new(), false)),
        }
    }

    pub(crate) fn source(&self) -> &Arc<dyn Inbound> {
        &self.source
    }

    /// Starts the thread, which feeds `target` until [`stop`](Self::stop).
    pub(crate) fn start<T: Target>(self: &Arc<Self>, target: Arc<T>, name: String) -> std::io::Result<()> {
        let (exited_tx, exited) = crossbeam_channel::bounded(1);
        let pump = Arc::clone(self);
        // Running from before the spawn: the thread may exit before `spawn` returns.
        self.kept.lock().1 = true;
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            pump.run(&*target);
            drop(target);
            let kept = {
                let mut kept = pump.kept.lock();
                kept.1 = false;
                std::mem::take(&mut kept.0)
            };
            drop(kept);
            let _ = exited_tx.send(());
        });
        let handle = spawned.inspect_err(|_| self.kept.lock().1 = false)?;
        *self.thread.lock() = Some((handle, exited));
        Ok(())
    }

    /// Pushes the subscription patterns to the source if they changed since the last push. Called
    /// by `subscribe` (so an event published by another instance after `subscribe` returns is
    /// let through) and on every loop of the thread (which catches up after unsubscribes and
    /// failed pushes).
    pub(crate) fn sync_filter(&self, table: &SubscriptionTable) {
        let mut pushed = self.pushed.lock();
        if *pushed == table.load().generation() {
            return;
        }
        let (patterns, generation) = table.patterns();
        if patterns.is_empty() {
            // Nothing is fetched while nothing is subscribed (see `run`), so the filter stays as
            // it was: in a work queue whose members share one consumer (NATS), an empty filter
            // would hold the group's events back from every member.
            *pushed = generation;
            return;
        }
        match self.source.set_filter(&patterns) {
            Ok(()) => *pushed = generation,
            Err(error) => {
                self.counters.filter_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "pushing the subscription filter to the inbound source failed; retrying");
            }
        }
    }

    /// Asks the thread to stop fetching; it gives back what it holds and exits.
    pub(crate) fn stop(&self) {
        // Relaxed: a request; the thread reads it between fetches, and the join orders the rest.
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Tells the stopped thread that the shards are drained (or abandoned): it stops extending
    /// the claims of what they held, and exits.
    pub(crate) fn drained(&self) {
        // Relaxed: a request, as `stop`.
        self.drained.store(true, Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Waits for the thread to exit until `deadline`; `false` if it is still running (a fetch that
    /// hangs in the provider), in which case it is left to finish on its own.
    pub(crate) fn join(&self, deadline: Instant) -> bool {
        let Some((handle, exited)) = self.thread.lock().take() else { return true };
        if exited.recv_deadline(deadline).is_err() {
            return false;
        }
        let _ = handle.join();
        true
    }

    /// Keeps `value` until the thread exits, or drops it now if it did (or never started): what a
    /// shutdown that gave up on the thread (see [`join`](Self::join)) must not release while it
    /// may still fetch, the broker's hold on its instance id above all.
    pub(crate) fn keep_until_exit(&self, value: Box<dyn Send>) {
        let mut kept = self.kept.lock();
        if kept.1 {
            kept.0.push(value);
        } else {
            drop(kept);
            drop(value);
        }
    }

    pub(crate) fn stats(&self) -> InboundStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        InboundStats {
            fetched: load(&c.fetched),
            fetch_errors: load(&c.fetch_errors),
            filter_errors: load(&c.filter_errors),
            invalid: load(&c.invalid),
            returned: load(&c.returned),
            lost: self.source.lost(),
            lag: c.lag(Instant::now()),
        }
    }

    fn run(&self, target: &impl Target) {
        self.await_settled_subscriptions(target.table());
        let mut backoff = FIRST_BACKOFF;
        let mut next_sweep = Instant::now();
        let mut next_extend = crate::deadline::from_now(self.extend_every);
        while !self.stopping() {
            self.extend_held(target, &mut next_extend);
            // Only while no event from other instances is held: one waiting in a shard for an
            // abandoned subscription must find it there, gone, and so go back to its group in a
            // work queue, however long it waited (an unsubscribe's give-back window is 2 s).
            if Instant::now() >= next_sweep && self.held(target.inbound_ended()) == 0 {
                target.table().end_abandoned();
                next_sweep = crate::deadline::from_now(ABANDONED_SWEEP);
            }
            self.sync_filter(target.table());
            if target.table().load().is_empty() {
                // Nothing is wanted yet: fetching would pass the group's events over for good.
                self.sleep_unless_stopped(SUBSCRIPTIONS_POLL);
                continue;
            }
            let ended = target.inbound_ended();
            let held = self.held(ended);
            let room = target.room().min(FETCH_MAX).min(self.prefetch.saturating_sub(held));
            if room == 0 {
                if held >= self.prefetch {
                    // The worker that ends one of them wakes this thread: with a small prefetch
                    // (a work queue's) and fast handlers, a timer would leave the workers idle.
                    target.wait_for_ends(ended, HELD_WAIT);
                } else {
                    // The shards, or the writer's settle backlog, are full.
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            match self.source.fetch(room, Self::patience(next_extend)) {
                Ok(events) => {
                    backoff = FIRST_BACKOFF;
                    self.note_lag(&events);
                    // Relaxed: a statistic.
                    self.counters.failing.store(false, Ordering::Relaxed);
                    self.place_all(target, events, &mut next_extend);
                }
                Err(error) if matches!(error.kind(), ProviderErrorKind::Closed) => {
                    tracing::warn!(%error, "the inbound source is closed; no more events from other instances");
                    return;
                }
                Err(error) => {
                    // Relaxed: a statistic.
                    self.counters.failing.store(true, Ordering::Relaxed);
                    let errors = self.counters.fetch_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if errors.is_power_of_two() {
                        tracing::warn!(%error, errors, retry_in = ?backoff, "fetching from other instances failed; local dispatch goes on");
                    }
                    self.sleep_extending(target, backoff, &mut next_extend);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // Shutdown drains the shards through the workers: what they hold is still this member's,
        // handled and acknowledged by it, and keeps its claims until then.
        // Relaxed: see `drained`.
        while !self.drained.load(Ordering::Relaxed) && !target.held_tokens().is_empty() {
            self.extend_held(target, &mut next_extend);
            std::thread::sleep(
                next_extend.saturating_duration_since(Instant::now()).min(Duration::from_millis(10)),
            );
        }
    }

    /// How long a fetch, or a placement, may wait: [`FETCH_WAIT`], but no later than the next
    /// extension of the claims held (a claim idle time under 300 ms extends more often).
    fn patience(next_extend: Instant) -> Duration {
        FETCH_WAIT.min(next_extend.saturating_duration_since(Instant::now())).max(Duration::from_millis(1))
    }

    /// Sleeps `wait` unless stopped, extending the claims of the events held meanwhile.
    fn sleep_extending(&self, target: &impl Target, wait: Duration, next_extend: &mut Instant) {
        let until = crate::deadline::from_now(wait);
        while !self.stopping() {
            self.extend_held(target, next_extend);
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep(
                (until - now).min(next_extend.saturating_duration_since(now)).min(Duration::from_millis(10)),
            );
        }
    }

    /// Inbound events the broker holds: placed into its shards and not yet ended by a worker,
    /// of which `ended` were.
    fn held(&self, ended: u64) -> usize {
        // Relaxed: a count. A worker's count read ahead of its placement only holds a fetch back
        // until the next look.
        let placed = self.counters.fetched.load(Ordering::Relaxed);
        usize::try_from(placed.saturating_sub(ended)).unwrap_or(usize::MAX)
    }

    /// Waits until `table` has subscriptions that have not changed for [`SETTLE`], or for
    /// [`SETTLE_MAX`] since the first of them, or until the thread is stopped (see the module
    /// docs).
    fn await_settled_subscriptions(&self, table: &SubscriptionTable) {
        let mut generation = table.load().generation();
        let mut changed = Instant::now();
        let mut first = None;
        while !self.stopping() {
            let now = Instant::now();
            // One snapshot for both looks, taken without the table's lock.
            let set = table.load();
            if set.generation() != generation {
                (generation, changed) = (set.generation(), now);
            }
            if !set.is_empty() {
                let first = *first.get_or_insert(now);
                if now.duration_since(changed) >= SETTLE || now.duration_since(first) >= SETTLE_MAX {
                    return;
                }
            }
            self.sleep_unless_stopped(SUBSCRIPTIONS_POLL);
        }
    }

    /// Records how far behind its publishers a fetched batch is: once per fetch, never per event
    /// on the workers.
    fn note_lag(&self, events: &[InboundEvent]) {
        let oldest = events.iter().map(|e| e.event.created_at).min();
        let lag = oldest.map_or(Duration::ZERO, |created| {
            // A publisher's clock ahead of ours reads as no lag.
            Duration::try_from(crate::clock::now().duration_since(created)).unwrap_or(Duration::ZERO)
        });
        let micros = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        // Relaxed: statistics.
        self.counters.lag_micros.store(micros, Ordering::Relaxed);
        let now = self.counters.micros_since_start(Instant::now());
        self.counters.fetched_at_micros.store(now, Ordering::Relaxed);
    }

    /// Extends the claims of the events held, when `next` has come: events waiting in the shards
    /// (behind slow handlers, say) keep their claims, where another member of a work queue would
    /// take them after the claim idle time, and both handle them.
    fn extend_held(&self, target: &impl Target, next: &mut Instant) {
        if Instant::now() < *next {
            return;
        }
        let held = target.held_tokens();
        // Straight to the source, not through the writer: a batch the writer keeps retrying (a
        // store the provider refuses) must not hold the claims back past the claim idle time.
        if !held.is_empty()
            && let Err(error) = self.source.extend(&held)
        {
            tracing::warn!(%error, events = held.len(), "extending the claims of held inbound events failed; retrying");
        }
        *next = crate::deadline::from_now(self.extend_every);
    }

    fn place_all(&self, target: &impl Target, events: Vec<InboundEvent>, next_extend: &mut Instant) {
        let mut invalid = Outbox::default();
        let mut valid = Vec::with_capacity(events.len());
        for inbound in events {
            if let Err(error) = validate_event_type(&inbound.event.event_type) {
                // It can never match a subscription; kept as a dead letter, not dropped.
                let failure = DeliveryFailure {
                    subscription_id: SubscriptionId::from_raw(0),
                    pattern: String::new(),
                    error: error.to_string(),
                    attempts: 0,
                };
                let letter = dead_letter(&inbound.event, &failure);
                invalid.letter_tokens.push((letter.id, inbound.token));
                invalid.dead_letters.push(letter);
                invalid.acks.push(crate::Ack::dead_lettered(inbound.token));
                self.counters.invalid.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            valid.push(inbound);
        }
        // All of them at once: those waiting for room while the first are placed keep their
        // claims too.
        target.hold(valid.iter().map(|inbound| inbound.token));
        let mut events = valid.into_iter();
        while let Some(inbound) = events.next() {
            let token = inbound.token;
            let mut job = Job { event: inbound.event, origin: Origin::Inbound(token) };
            // Counted before it is placed, so that a broker's `published` (what its rings took
            // less what this placed) never counts an inbound event, even for a moment. Release:
            // see `Engine::stats`.
            self.counters.fetched.fetch_add(1, Ordering::Release);
            loop {
                match target.place(job, Self::patience(*next_extend)) {
                    Ok(()) => break,
                    Err((_, closed)) if closed || self.stopping() => {
                        self.counters.fetched.fetch_sub(1, Ordering::Relaxed);
                        let mut tokens = vec![token];
                        tokens.extend(events.by_ref().map(|e| e.token));
                        target.release(&tokens);
                        self.give_back(&tokens);
                        target.settle(&mut invalid);
                        return;
                    }
                    Err((back, _)) => {
                        job = back;
                        // Waiting for room can take long behind slow handlers.
                        self.extend_held(target, next_extend);
                    }
                }
            }
        }
        target.settle(&mut invalid);
    }

    /// Gives fetched events back to the group, directly: the writer may be stopping too.
    fn give_back(&self, tokens: &[AckToken]) {
        self.counters.returned.fetch_add(tokens.len() as u64, Ordering::Relaxed);
        if let Err(error) = self.source.nak(tokens, Duration::ZERO) {
            tracing::warn!(%error, events = tokens.len(), "giving unplaced inbound events back failed; the group redelivers them after its claim idle time");
        }
    }

    fn sleep_unless_stopped(&self, wait: Duration) {
        let until = crate::deadline::from_now(wait);
        while !self.stopping() {
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(10)));
        }
    }
}
