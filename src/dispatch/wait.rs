//! How an idle shard consumer waits for work, and how producers wake it.
//!
//! A shard's worker drains its ring in batches; when the ring is empty it waits according to a
//! [`WaitStrategy`]. The default, [`WaitStrategy::Blocking`], escalates in three phases:
//!
//! | phase | default length | cost while idle | wake-up latency |
//! |---|---|---|---|
//! | spin (8 `spin_loop` hints between polls) | 64 polls, ≈ 11 µs | one core | ≤ 0.2 µs |
//! | yield (`yield_now` between polls) | 16 polls, ≈ 6 µs on an idle core, longer when others run | the core, if nobody else wants it | ≈ 0.4 µs |
//! | park (until a producer unparks it) | unbounded | none | ≈ 20 µs (a futex wake) |
//!
//! (Durations measured on the project's reference machine, a Zen-class core where one
//! `spin_loop` hint costs ≈ 22 ns and a `yield_now` ≈ 0.35 µs. On an Intel Xeon host of the same
//! machine kind a hint costs ≈ 12 ns and a yield ≈ 0.22 µs, so both phases are about half as
//! long.) The two active phases together last about one park/unpark round trip, the classic
//! competitive-spinning choice: a burst whose events arrive within ~15 µs of each other finds the
//! worker awake, and an idle worker costs at most twice what an oracle would have paid before it
//! stops using the CPU altogether.
//!
//! ## Why spinning polls are spaced out
//!
//! A spinning consumer that has caught up reads the very slot the producer writes next. Polled
//! after every hint (≈ 22 ns), it takes that cache line away from each push in turn, and the
//! producer's claim (a locked CAS, which waits for its earlier stores) stalls on the transfer:
//! ≈ 45 ns a push in the SPSC bench, worse than `crossbeam-channel`. Eight hints between polls let
//! the producer write a few slots undisturbed: ≈ 15–25 ns a push, for at most ≈ 0.2 µs of added
//! latency. While spinning, a poll reads only that slot; the tail, which producers CAS, is read
//! at the eighth poll of a wait and every eighth after it (to notice a close), in the yield phase,
//! and in the park handshake: a consumer reading it on every poll took the line from every claim
//! (≈ 440 ns a push). Not at the first poll of a wait, either: a consumer that keeps up waits
//! after nearly every value, and a tail read there took the line from nearly every claim (the
//! SPSC bench on a Xeon host, 56–72 ns between its two vCPUs: 130 ns a push, against 29–38 with
//! the first look at the slot alone).
//!
//! ## No lost wake-ups
//!
//! A consumer about to park announces it (the `sleeping` flag of [`Sleeper`]), issues a `SeqCst`
//! fence, and looks at the ring's tail once more; it parks only if nothing was claimed and the ring
//! is open. A producer, right after claiming a slot (the tail CAS) or closing the ring (the tail
//! `fetch_or`), issues a `SeqCst` fence and loads the flag; if it is set, it unparks the consumer
//! once its value is published. This is Dekker's pattern: the two fences are totally ordered, so
//! either the producer sees the flag, or the consumer's second look sees the claim — never
//! neither. When nobody sleeps, a producer pays one fence and one load of a cache line that only
//! changes when the consumer parks.
//!
//! Wake-ups may be spurious (a late unpark meant for an earlier sleep, a timed park that ran out,
//! the OS); the waiting loop re-polls the ring after every one of them.

use std::time::Instant;

use crossbeam_utils::CachePadded;

use crate::sync::Ordering::{Acquire, Relaxed, Release, SeqCst};
use crate::sync::hint::spin_loop;
use crate::sync::thread::{self, Thread};
use crate::sync::{AtomicBool, UnsafeCell, fence};

/// How a shard's worker waits when its ring buffer is empty.
///
/// Set it with the broker's builder; the default is [`WaitStrategy::Blocking`] with
/// [`DEFAULT_SPINS`](WaitStrategy::DEFAULT_SPINS) and
/// [`DEFAULT_YIELDS`](WaitStrategy::DEFAULT_YIELDS), which suits shared machines: bursts are
/// picked up by a spinning worker, and an idle worker sleeps.
///
/// ```
/// use eventbroker::WaitStrategy;
///
/// // Dedicated cores, lowest latency: every worker keeps a core busy, forever.
/// let latency = WaitStrategy::BusySpin;
/// // Park sooner than the default: about 1 µs of spinning, then sleep.
/// let frugal = WaitStrategy::Blocking { spins: 5, yields: 0 };
/// assert_ne!(latency, frugal);
/// assert_eq!(
///     WaitStrategy::default(),
///     WaitStrategy::Blocking {
///         spins: WaitStrategy::DEFAULT_SPINS,
///         yields: WaitStrategy::DEFAULT_YIELDS,
///     },
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitStrategy {
    /// Poll the ring in a loop with 8 `spin_loop` hints between polls; never yield, never park.
    /// Lowest latency (a hand-off costs a cache-line transfer plus at most ≈ 0.2 µs), but each
    /// worker burns a whole core even when idle. Only for machines with a core to spare per
    /// shard.
    BusySpin,
    /// Spin [`DEFAULT_SPINS`](WaitStrategy::DEFAULT_SPINS) polls, then call `yield_now` between
    /// polls; never park. An idle worker gives its core to any thread that wants it, but still
    /// shows as busy and wakes within a scheduler slice.
    Yielding,
    /// Spin `spins` polls, then yield `yields` times, then park until a producer (or the shard's
    /// close, or the worker's next timer) wakes the worker. An idle worker uses no CPU; waking a
    /// parked one costs ≈ 20 µs.
    Blocking {
        /// Polls with 8 `spin_loop` hints between them (≈ 0.18 µs each on this project's
        /// reference machine) before yielding.
        spins: u32,
        /// Polls with a `yield_now` between them (≈ 0.35 µs each when no other thread is
        /// runnable) before parking.
        yields: u32,
    },
}

impl WaitStrategy {
    /// Default spin polls before yielding: 64, ≈ 11 µs.
    pub const DEFAULT_SPINS: u32 = 64;
    /// Default yields before parking: 16, ≈ 6 µs on an otherwise idle core.
    pub const DEFAULT_YIELDS: u32 = 16;

    /// `spin_loop` hints between two polls while spinning (see the module docs).
    const HINTS_PER_SPIN: u32 = 8;

    /// While spinning, every this many polls (≈ 1.4 µs) is a full look at the ring and the clock,
    /// the last of each run of them: a close or a deadline is noticed within that. The other polls,
    /// the first of a wait among them, read only the next slot.
    const FULL_LOOK_EVERY: u64 = 8;

    /// What to do after the `round`-th unsuccessful poll (counting from 0). Rounds count in `u64`
    /// so that they never wrap or saturate (2⁶⁴ polls take millennia), which would stop the clock
    /// checks of a long busy spin.
    fn phase(self, round: u64) -> Phase {
        match self {
            Self::BusySpin => Phase::Spin,
            Self::Yielding if round < u64::from(Self::DEFAULT_SPINS) => Phase::Spin,
            Self::Yielding => Phase::Yield,
            Self::Blocking { spins, .. } if round < u64::from(spins) => Phase::Spin,
            Self::Blocking { spins, yields } if round - u64::from(spins) < u64::from(yields) => Phase::Yield,
            Self::Blocking { .. } => Phase::Park,
        }
    }

    /// Waits until `ring` is ready or closed and drained, or `deadline` passes.
    ///
    /// Each round first looks at the ring: a full [`Pollable::poll`] in the yield and park phases
    /// and at the last of every [`FULL_LOOK_EVERY`](Self::FULL_LOOK_EVERY) spins, else only
    /// [`Pollable::is_ready`] (see the module docs for why).
    ///
    /// # Safety
    ///
    /// `sleeper` must be the [`Sleeper`] of `ring`, and only that ring's single consumer may call
    /// this, from one thread at a time.
    pub(crate) unsafe fn wait(
        self,
        sleeper: &Sleeper,
        deadline: Option<Instant>,
        ring: &impl Pollable,
    ) -> WaitOutcome {
        let mut round: u64 = 0;
        loop {
            let phase = self.phase(round);
            if phase != Phase::Spin || round % Self::FULL_LOOK_EVERY == Self::FULL_LOOK_EVERY - 1 {
                match ring.poll() {
                    Poll::Ready => return WaitOutcome::Ready,
                    Poll::Closed => return WaitOutcome::Closed,
                    Poll::Pending | Poll::Empty => {}
                }
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return WaitOutcome::TimedOut;
                }
            } else if ring.is_ready() {
                return WaitOutcome::Ready;
            }
            match phase {
                Phase::Spin => {
                    for _ in 0..Self::HINTS_PER_SPIN {
                        spin_loop();
                    }
                }
                Phase::Yield => thread::yield_now(),
                // SAFETY: forwarded from this function's contract.
                Phase::Park => match unsafe { sleeper.park(deadline, ring) } {
                    Poll::Ready => return WaitOutcome::Ready,
                    Poll::Closed => return WaitOutcome::Closed,
                    Poll::Pending | Poll::Empty => {}
                },
            }
            round += 1;
        }
    }
}

impl Default for WaitStrategy {
    /// [`WaitStrategy::Blocking`] with [`DEFAULT_SPINS`](WaitStrategy::DEFAULT_SPINS) and
    /// [`DEFAULT_YIELDS`](WaitStrategy::DEFAULT_YIELDS).
    fn default() -> Self {
        Self::Blocking { spins: Self::DEFAULT_SPINS, yields: Self::DEFAULT_YIELDS }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Spin,
    Yield,
    Park,
}

/// The consumer's view of its ring, as [`WaitStrategy::wait`] looks at it.
pub(crate) trait Pollable {
    /// Whether the next value is published. Reads only its slot, the line its producer writes
    /// anyway; cheap to repeat while spinning.
    fn is_ready(&self) -> bool;

    /// A full look, the tail included. Inside the park handshake, that tail load is the consumer's
    /// Dekker read (see the module docs).
    fn poll(&self) -> Poll;
}

/// What a full look at the ring found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Poll {
    /// The next value is published: a pop will return it.
    Ready,
    /// The next position is claimed but its value not yet published: it will be in nanoseconds,
    /// unless its producer was preempted.
    Pending,
    /// Nothing claimed past the consumer, and the ring is open.
    Empty,
    /// The ring is closed and every claimed value has been consumed: nothing will ever arrive.
    Closed,
}

/// Why [`Consumer::wait`](super::ring::Consumer::wait) returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A value is ready: the next `pop` or `pop_batch` returns at least one.
    Ready,
    /// The deadline passed with the ring still empty.
    TimedOut,
    /// The ring is closed and drained: every value pushed before the close has been popped.
    Closed,
}

/// The consumer's announcement that it is about to park, shared with every producer.
pub(crate) struct Sleeper {
    /// `true` from just before the consumer's last look at the ring until it wakes. Written only
    /// by the consumer, read by every producer after every claim: it gets a cache line of its own
    /// that stays shared while the consumer is awake.
    sleeping: CachePadded<AtomicBool>,
    /// The consumer's thread. Written once, by the consumer, before its first `Release` store of
    /// `sleeping`; read only by a producer that has seen `sleeping == true` with `Acquire`.
    thread: UnsafeCell<Option<Thread>>,
}

// SAFETY: `thread` is written once, before any thread can read it, and only read afterwards (see
// the field's docs); `Thread` itself is `Send + Sync`.
unsafe impl Send for Sleeper {}
// SAFETY: as for `Send`.
unsafe impl Sync for Sleeper {}

impl Sleeper {
    pub(crate) fn new() -> Self {
        Self { sleeping: CachePadded::new(AtomicBool::new(false)), thread: UnsafeCell::new(None) }
    }

    /// Producer side: call right after a claim or a close has been made (the tail CAS or
    /// `fetch_or`), and wake the returned consumer once the claimed value is published.
    #[inline]
    pub(crate) fn check_after_claim(&self) -> Option<SleepingConsumer<'_>> {
        // SeqCst fence: the producer half of the Dekker handshake. It is ordered with the fence in
        // `park`: if ours comes first, the consumer's tail load sees our claim and it does not
        // park; if theirs does, the load below sees `sleeping == true`.
        fence(SeqCst);
        // Acquire: pairs with the Release store in `park`, so the `thread` written before it is
        // visible to `SleepingConsumer::unpark`.
        self.sleeping.load(Acquire).then_some(SleepingConsumer(self))
    }

    /// Consumer side: announces the sleep, looks at `ring` once more, and parks (until
    /// `deadline`, if any) only if it found it [`Poll::Empty`]. Returns what it found; after an
    /// `Empty` the caller looks again, since the wake-up may be spurious.
    ///
    /// # Safety
    ///
    /// Only the ring's single consumer may call this, from one thread at a time.
    unsafe fn park(&self, deadline: Option<Instant>, ring: &impl Pollable) -> Poll {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.bind_current_thread() };
        // Release: publishes `thread` to the producer whose Acquire load in `check_after_claim`
        // sees this store.
        self.sleeping.store(true, Release);
        // SeqCst fence: the consumer half of the Dekker handshake (see `check_after_claim`).
        fence(SeqCst);
        let found = ring.poll();
        match found {
            Poll::Empty => match deadline {
                None => thread::park(),
                Some(deadline) => {
                    let now = Instant::now();
                    if now < deadline {
                        thread::park_timeout(deadline - now);
                    }
                }
            },
            // Its producer is between claim and publish, maybe preempted: let it run.
            Poll::Pending => thread::yield_now(),
            Poll::Ready | Poll::Closed => {}
        }
        // Relaxed: a producer that still reads `true` only unparks us once more, a spurious
        // wake-up that the waiting loop absorbs.
        self.sleeping.store(false, Relaxed);
        found
    }

    /// Records the calling thread as the one producers unpark, the first time; afterwards checks
    /// that it is still the same thread.
    ///
    /// # Safety
    ///
    /// As for [`park`](Self::park).
    unsafe fn bind_current_thread(&self) {
        let current = thread::current();
        // SAFETY: a shared read; the one write (below, on this thread) precedes every producer read.
        let bound = self.thread.with(|slot| unsafe { (*slot).as_ref().map(Thread::id) });
        match bound {
            Some(id) => assert!(
                id == current.id(),
                "a ring's consumer must always wait on the thread it first waited on"
            ),
            // SAFETY: `sleeping` was never set, so no producer reads `thread`; only we write it.
            None => self.thread.with_mut(|slot| unsafe { *slot = Some(current) }),
        }
    }

    /// Whether the consumer has announced a sleep and not yet woken (tests only).
    #[cfg(all(test, not(eventbroker_loom)))]
    pub(crate) fn is_sleeping(&self) -> bool {
        self.sleeping.load(SeqCst)
    }
}

/// A consumer seen sleeping by [`Sleeper::check_after_claim`].
pub(crate) struct SleepingConsumer<'a>(&'a Sleeper);

impl SleepingConsumer<'_> {
    /// Unparks the consumer. Call after publishing the claimed value.
    pub(crate) fn unpark(self) {
        // This value exists only after an Acquire load saw `sleeping == true`, which the consumer
        // stores only after writing `thread` once and for all.
        self.0.thread.with(|slot| {
            // SAFETY: a shared read, with no write after the one the Acquire load synchronised with.
            if let Some(thread) = unsafe { &*slot } {
                thread.unpark();
            }
        });
    }
}

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::dispatch::ring::ring;

    const SECOND: Duration = Duration::from_secs(1);
    const PARK_NOW: WaitStrategy = WaitStrategy::Blocking { spins: 0, yields: 0 };

    #[test]
    fn phases_follow_the_counts() {
        let strategy = WaitStrategy::Blocking { spins: 2, yields: 1 };
        let phases: Vec<_> = (0..4).map(|round| strategy.phase(round)).collect();
        assert_eq!(phases, [Phase::Spin, Phase::Spin, Phase::Yield, Phase::Park]);
        assert_eq!(PARK_NOW.phase(0), Phase::Park);
        assert_eq!(WaitStrategy::BusySpin.phase(u64::MAX), Phase::Spin);
        assert_eq!(WaitStrategy::Yielding.phase(0), Phase::Spin);
        assert_eq!(WaitStrategy::Yielding.phase(u64::MAX), Phase::Yield);
        let longest = WaitStrategy::Blocking { spins: u32::MAX, yields: u32::MAX };
        assert_eq!(longest.phase(u64::from(u32::MAX) * 2 - 1), Phase::Yield);
        assert_eq!(longest.phase(u64::from(u32::MAX) * 2), Phase::Park);
    }

    #[test]
    fn returns_at_once_when_ready_or_closed() {
        let (producer, mut consumer) = ring::<u32>(2);
        producer.try_push(1).unwrap();
        for strategy in [WaitStrategy::BusySpin, WaitStrategy::Yielding, PARK_NOW] {
            assert_eq!(consumer.wait(strategy, None), WaitOutcome::Ready);
        }
        assert_eq!(consumer.pop(), Some(1));
        producer.close();
        for strategy in [WaitStrategy::BusySpin, WaitStrategy::Yielding, PARK_NOW] {
            assert_eq!(consumer.wait(strategy, None), WaitOutcome::Closed);
        }
    }

    /// A ring that is ready from its `ready_at`-th look on (counting from 0), and records which of
    /// the looks were full ones.
    struct Counted {
        looks: std::cell::Cell<u64>,
        ready_at: u64,
        full: std::cell::RefCell<Vec<u64>>,
    }

    impl Counted {
        fn look(&self) -> bool {
            let look = self.looks.get();
            self.looks.set(look + 1);
            look >= self.ready_at
        }
    }

    impl Pollable for Counted {
        fn is_ready(&self) -> bool {
            self.look()
        }

        fn poll(&self) -> Poll {
            self.full.borrow_mut().push(self.looks.get());
            if self.look() { Poll::Ready } else { Poll::Empty }
        }
    }

    /// A consumer that keeps up waits after nearly every value; the first look of a wait must not
    /// load the tail, which every producer's claim swaps (see the module docs).
    #[test]
    fn spinning_looks_in_full_at_every_eighth_poll_and_not_at_the_first() {
        let ring = Counted { looks: 0.into(), ready_at: 20, full: Vec::new().into() };
        let sleeper = Sleeper::new();
        // One thread; `BusySpin` never parks, so the sleeper (no ring's) is never used.
        // SAFETY: the contract's sleeper and single consumer matter only to parking.
        let outcome = unsafe { WaitStrategy::BusySpin.wait(&sleeper, None, &ring) };
        assert_eq!(outcome, WaitOutcome::Ready);
        assert_eq!(ring.looks.get(), 21);
        assert_eq!(*ring.full.borrow(), [7, 15]);
    }

    #[test]
    fn times_out_on_an_empty_ring() {
        let (_producer, mut consumer) = ring::<u32>(2);
        let past = Instant::now();
        for strategy in [WaitStrategy::BusySpin, WaitStrategy::Yielding, WaitStrategy::default()] {
            assert_eq!(consumer.wait(strategy, Some(past)), WaitOutcome::TimedOut);
            let start = Instant::now();
            let outcome = consumer.wait(strategy, Some(start + Duration::from_millis(20)));
            assert_eq!(outcome, WaitOutcome::TimedOut);
            assert!(start.elapsed() >= Duration::from_millis(20));
        }
    }

    /// Runs `wake` once the consumer, on its own thread, is parked; returns what its wait saw.
    fn parked_consumer_then(
        wake: impl FnOnce(&crate::dispatch::ring::Producer<u32>),
    ) -> (WaitOutcome, Option<u32>) {
        let (producer, mut consumer) = ring::<u32>(4);
        let (done_tx, done_rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            // Long enough never to be reached, short enough not to hang the suite on a bug.
            let outcome = consumer.wait(PARK_NOW, Some(Instant::now() + 30 * SECOND));
            done_tx.send(()).unwrap();
            (outcome, consumer.pop())
        });
        let start = Instant::now();
        while !producer.shared_sleeper().is_sleeping() {
            assert!(start.elapsed() < 10 * SECOND, "the consumer never parked");
            std::thread::yield_now();
        }
        wake(&producer);
        // The bound is generous (a wake costs ~20 µs); it only catches a lost wake-up.
        done_rx.recv_timeout(10 * SECOND).expect("the parked consumer was not woken");
        worker.join().unwrap()
    }

    #[test]
    fn a_push_wakes_a_parked_consumer() {
        let (outcome, value) = parked_consumer_then(|producer| producer.try_push(7).unwrap());
        assert_eq!((outcome, value), (WaitOutcome::Ready, Some(7)));
    }

    #[test]
    fn a_batch_push_wakes_a_parked_consumer() {
        let (outcome, value) = parked_consumer_then(|producer| {
            let mut values = (1..=3).collect();
            assert_eq!(producer.try_push_batch(&mut values), Ok(3));
        });
        assert_eq!((outcome, value), (WaitOutcome::Ready, Some(1)));
    }

    #[test]
    fn close_wakes_a_parked_consumer() {
        let (outcome, value) = parked_consumer_then(|producer| assert!(producer.close()));
        assert_eq!((outcome, value), (WaitOutcome::Closed, None));
    }

    #[test]
    #[should_panic(expected = "must always wait on the thread it first waited on")]
    fn a_consumer_may_not_change_threads_between_parks() {
        let (_producer, consumer) = ring::<u32>(2);
        let mut consumer = std::thread::spawn(move || {
            let mut consumer = consumer;
            assert_eq!(consumer.wait(PARK_NOW, Some(Instant::now() + SECOND / 1000)), WaitOutcome::TimedOut);
            consumer
        })
        .join()
        .unwrap();
        consumer.wait(PARK_NOW, Some(Instant::now() + SECOND / 1000));
    }
}
