//! What a publisher does when its shard is full, and how a blocked publisher learns there is
//! room again.
//!
//! Under [`Backpressure::Block`] a publisher facing a full ring spins briefly (about 1 µs), then
//! yields a few times, then parks on its shard's [`SpaceWaiters`] until the worker frees slots
//! (or the deadline passes). The worker signals after every batch it drains, at the cost of one
//! fence and one load when nobody waits. So a full shard hands its space to the publisher as soon
//! as there is some, instead of the publisher sleeping on a timer while the worker runs dry and
//! parks: the two would otherwise take turns sleeping.
//!
//! A task of an async runtime waits the same way without a thread of its own
//! ([`Broker::publish_when_room`](crate::Broker::publish_when_room)): [`SpaceWaiters::room`] is a
//! future that leaves its waker where the parked publishers are counted, and the same signal wakes
//! it. Its deadline is a timer on [`futures_timer`]'s thread, so it needs no particular runtime.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::sync::Ordering::{Relaxed, SeqCst};
use crate::sync::{AtomicUsize, fence};

/// What publishing does when the event's shard (or the provider writer's backlog) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// Return [`PublishError::Full`](crate::PublishError::Full) at once.
    Reject,
    /// Wait for room up to this long, then return [`PublishError::Full`](crate::PublishError::Full).
    Block(Duration),
}

impl Default for Backpressure {
    /// Block for up to 1 s.
    fn default() -> Self {
        Self::Block(Duration::from_secs(1))
    }
}

/// Publishers parked on a full shard, and the worker's signal that it freed slots.
///
/// The mutex and condvar are `parking_lot`'s and outside the loom shim: they only ever guard the
/// condvar's wait, and the lost-wake-up argument rests on the atomic handshake below.
pub(crate) struct SpaceWaiters {
    /// Publishers inside `wait_until`, and tasks with a waker in `tasks`.
    waiting: AtomicUsize,
    lock: parking_lot::Mutex<()>,
    freed: parking_lot::Condvar,
    tasks: parking_lot::Mutex<Tasks>,
}

/// The wakers of tasks waiting for room, each under the key its [`Room`] future holds: a task
/// polled again, or dropped, finds its own in constant time, however many wait.
#[derive(Default)]
struct Tasks {
    next_key: u64,
    wakers: HashMap<u64, Waker, foldhash::fast::RandomState>,
}

impl SpaceWaiters {
    pub(crate) fn new() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            lock: parking_lot::Mutex::new(()),
            freed: parking_lot::Condvar::new(),
            tasks: parking_lot::Mutex::new(Tasks::default()),
        }
    }

    /// A future that is ready when `has_room()` holds (checked after every signal), or when
    /// `deadline` fires; like [`SpaceWaiters::wait_until`], the caller re-checks which it was. The
    /// caller keeps the timer across waits, so a task that loses the race for a freed slot does not
    /// set a new one each time.
    pub(crate) fn room<'a, F: Fn() -> bool>(
        &'a self,
        deadline: &'a mut futures_timer::Delay,
        has_room: F,
    ) -> Room<'a, F> {
        Room { waiters: self, ready: has_room, key: None, deadline }
    }

    /// Leaves `waker` to be woken by the next [`SpaceWaiters::notify`], under `key` (which it
    /// replaces the waker of, if it is still there; else a new key is taken).
    fn register(&self, key: &mut Option<u64>, waker: &Waker) {
        let mut tasks = self.tasks.lock();
        if let Some(key) = *key
            && let Some(registered) = tasks.wakers.get_mut(&key)
        {
            registered.clone_from(waker);
            return;
        }
        tasks.next_key += 1;
        let new = tasks.next_key;
        tasks.wakers.insert(new, waker.clone());
        *key = Some(new);
        // Inside the lock, as in `wait_until`: a worker that sees this count takes the lock after
        // it is released, and finds the waker.
        self.waiting.fetch_add(1, Relaxed);
    }

    /// Takes the waker under `key` back, if `notify` has not taken it.
    fn deregister(&self, key: u64) {
        if self.tasks.lock().wakers.remove(&key).is_some() {
            self.waiting.fetch_sub(1, Relaxed);
        }
    }

    /// Parks until `has_room()` holds or `deadline` passes; `has_room` also answers "closed", so
    /// the caller re-checks whichever it was.
    pub(crate) fn wait_until(&self, deadline: Instant, has_room: impl Fn() -> bool) {
        let mut guard = self.lock.lock();
        // Dekker with `notify`: we count ourselves, fence, then look at the ring; the worker
        // frees slots, fences, then looks at the count. The fences are totally ordered, so either
        // we see the freed slots or the worker sees us waiting, and then it takes the lock we
        // hold until the condvar wait releases it, so its notify cannot slip in before we wait.
        self.waiting.fetch_add(1, Relaxed);
        fence(SeqCst);
        while !has_room() {
            if self.freed.wait_until(&mut guard, deadline).timed_out() {
                break;
            }
        }
        self.waiting.fetch_sub(1, Relaxed);
    }

    /// Wakes every parked publisher, if there is one. Called by the worker after it frees slots,
    /// and by shutdown after it closes the ring.
    pub(crate) fn notify(&self) {
        // See `wait_until`: the slots were freed (or the ring closed) before this fence.
        fence(SeqCst);
        if self.waiting.load(Relaxed) > 0 {
            {
                let _guard = self.lock.lock();
                self.freed.notify_all();
            }
            let woken: Vec<Waker> = {
                let mut tasks = self.tasks.lock();
                self.waiting.fetch_sub(tasks.wakers.len(), Relaxed);
                tasks.wakers.drain().map(|(_, waker)| waker).collect()
            };
            // Outside the lock: a waker may run its task's code (some executors poll inline).
            // Every waiting task is woken, as every parked thread is: those that lose the race
            // for the freed slots wait again.
            for waker in woken {
                waker.wake();
            }
        }
    }
}

/// What [`SpaceWaiters::room`] returns: ready once there is room (or the ring closed), or its
/// deadline fired; its waker waits among the shard's parked publishers meanwhile.
pub(crate) struct Room<'a, F> {
    waiters: &'a SpaceWaiters,
    /// Whether there is room, or the ring closed.
    ready: F,
    /// The key of the waker left with `waiters`, while one is there.
    key: Option<u64>,
    deadline: &'a mut futures_timer::Delay,
}

impl<F: Fn() -> bool + Unpin> Future for Room<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `Room` is `Unpin` (references are, and so is a closure of them), so it may be taken out
        // of its pin.
        let this = self.get_mut();
        if (this.ready)() {
            return Poll::Ready(());
        }
        this.waiters.register(&mut this.key, cx.waker());
        // Dekker with `notify`, as in `wait_until`: counted (in `register`), fence, look.
        fence(SeqCst);
        if (this.ready)() || Pin::new(&mut *this.deadline).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl<F> Drop for Room<'_, F> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.waiters.deregister(key);
        }
    }
}

/// How a publisher waits between attempts: spin, then yield, then (the caller's choice) park.
pub(crate) struct Backoff {
    step: u32,
}

/// Steps that spin (2⁰ … 2⁶ hints: about 1 µs in all here).
const SPIN_STEPS: u32 = 7;
/// Steps that yield after the spinning.
const YIELD_STEPS: u32 = 4;

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { step: 0 }
    }

    /// Spins or yields once; `false` once both phases are used up and the caller should park.
    pub(crate) fn snooze(&mut self) -> bool {
        if self.step < SPIN_STEPS {
            for _ in 0..(1u32 << self.step) {
                std::hint::spin_loop();
            }
        } else if self.step < SPIN_STEPS + YIELD_STEPS {
            std::thread::yield_now();
        } else {
            return false;
        }
        self.step += 1;
        true
    }

    /// Sleeps for a growing while (10 µs doubling to 1 ms): for conditions nobody signals.
    pub(crate) fn sleep(&mut self) {
        let exponent = self.step.saturating_sub(SPIN_STEPS + YIELD_STEPS).min(7);
        std::thread::sleep(Duration::from_micros(10 << exponent));
        self.step = self.step.saturating_add(1);
    }
}

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn a_parked_publisher_is_woken_by_notify_not_by_its_deadline() {
        let waiters = Arc::new(SpaceWaiters::new());
        let room = Arc::new(AtomicBool::new(false));
        let parked = {
            let (waiters, room) = (Arc::clone(&waiters), Arc::clone(&room));
            std::thread::spawn(move || {
                let started = Instant::now();
                waiters.wait_until(started + Duration::from_secs(30), || room.load(Relaxed));
                started.elapsed()
            })
        };
        while waiters.waiting.load(Relaxed) == 0 {
            std::thread::yield_now();
        }
        room.store(true, Relaxed);
        waiters.notify();
        assert!(parked.join().unwrap() < Duration::from_secs(10));
    }

    #[test]
    fn a_wait_ends_at_its_deadline() {
        let waiters = SpaceWaiters::new();
        let started = Instant::now();
        waiters.wait_until(started + Duration::from_millis(20), || false);
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(waiters.waiting.load(Relaxed), 0);
    }

    /// Runs `future` to completion on this thread, parking between polls.
    fn block_on<F: Future>(future: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
            std::thread::park();
        }
    }

    #[test]
    fn a_waiting_task_is_woken_by_notify_not_by_its_patience() {
        // Many rounds, the room made at a different moment of the task's poll each time: a lost
        // wake-up would leave a round waiting its 30 s.
        for round in 0..2_000u32 {
            let waiters = Arc::new(SpaceWaiters::new());
            let room = Arc::new(AtomicBool::new(false));
            let maker = {
                let (waiters, room) = (Arc::clone(&waiters), Arc::clone(&room));
                std::thread::spawn(move || {
                    for _ in 0..(round % 64) * 16 {
                        std::hint::spin_loop();
                    }
                    room.store(true, Relaxed);
                    waiters.notify();
                })
            };
            let started = Instant::now();
            let mut deadline = futures_timer::Delay::new(Duration::from_secs(30));
            block_on(waiters.room(&mut deadline, || room.load(Relaxed)));
            assert!(started.elapsed() < Duration::from_secs(10), "round {round} waited for its patience");
            maker.join().unwrap();
            assert_eq!(waiters.waiting.load(Relaxed), 0, "round {round}");
        }
    }

    #[test]
    fn a_task_wait_ends_at_its_patience() {
        let waiters = SpaceWaiters::new();
        let started = Instant::now();
        block_on(waiters.room(&mut futures_timer::Delay::new(Duration::from_millis(20)), || false));
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(waiters.waiting.load(Relaxed), 0, "the finished wait took its waker back");
    }

    #[test]
    fn a_task_counts_once_however_often_it_is_polled_and_not_after_it_is_dropped() {
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let waiters = SpaceWaiters::new();
        {
            let (mut one, mut two) = (
                futures_timer::Delay::new(Duration::from_secs(30)),
                futures_timer::Delay::new(Duration::from_secs(30)),
            );
            let mut first = std::pin::pin!(waiters.room(&mut one, || false));
            let mut second = std::pin::pin!(waiters.room(&mut two, || false));
            for _ in 0..3 {
                assert!(first.as_mut().poll(&mut cx).is_pending());
                assert!(second.as_mut().poll(&mut cx).is_pending());
            }
            assert_eq!(waiters.waiting.load(Relaxed), 2);
            waiters.notify();
            assert_eq!(waiters.waiting.load(Relaxed), 0, "notify took both wakers");
            assert!(first.as_mut().poll(&mut cx).is_pending());
            assert_eq!(waiters.waiting.load(Relaxed), 1, "polled again, it waits again");
        }
        assert_eq!(waiters.waiting.load(Relaxed), 0, "dropped, it took its waker back");
        assert!(waiters.tasks.lock().wakers.is_empty());
    }

    #[test]
    fn backoff_spins_then_yields_then_gives_up() {
        let mut backoff = Backoff::new();
        let steps = std::iter::from_fn(|| backoff.snooze().then_some(())).count();
        assert_eq!(steps, (SPIN_STEPS + YIELD_STEPS) as usize);
    }
}
