//! A bounded multi-producer, single-consumer ring buffer: one per shard.
//!
//! [`ring`] returns a cloneable [`Producer`] for publisher threads and the one [`Consumer`] for the
//! shard's worker. The design follows Dmitry Vyukov's bounded queue: each slot carries a *stamp*
//! saying which position's value it holds; producers claim positions with one CAS on a shared
//! tail; the consumer claims nothing and needs no CAS. Unlike Vyukov's queue, the consumer frees
//! slots by publishing its head once per batch, not by writing each slot's stamp back: a consumer
//! that keeps up reads the line a producer is writing the next value into, and a write of its own
//! there would send that line back and forth between the two cores once more for every value.
//!
//! ## Guarantees
//!
//! - **Capacity**: a power of two, at least 2. At most `capacity` values are in the ring at once,
//!   counting values whose producer has claimed a slot but not finished writing it.
//! - **Ordering**: values come out in the order their positions were claimed. Values pushed by one
//!   thread therefore come out in the order that thread pushed them (FIFO per producer), and a
//!   batch comes out contiguous and in order.
//! - **`Full`**: [`PushError::Full`] means that during the call `capacity` values were waiting for
//!   the consumer. The value is handed back, never dropped; a push that reports `Full` changed
//!   nothing. A batch push takes what fits and says how many.
//! - **Closing**: [`Producer::close`] (or [`Consumer::close`], or dropping the consumer) marks the
//!   tail with one atomic `fetch_or`. Every claim is ordered before or after that mark: a push
//!   ordered before it succeeds and its value will be popped (the consumer drains up to the final
//!   tail, waiting for slots still being written); a push ordered after it fails with
//!   [`PushError::Closed`] and hands its value back. Nothing is ever stranded: once
//!   [`Consumer::is_drained`] (or [`WaitOutcome::Closed`]) reports the end, every value that was
//!   accepted has been popped.
//! - **Waiting**: [`Consumer::wait`] waits for a value by a [`WaitStrategy`]; see
//!   [`wait`](super::wait) for the park handshake, which loses no wake-up.
//! - **Progress**: a push is lock-free (a failed CAS means another producer's succeeded); a pop
//!   is wait-free, but it cannot pass a slot whose producer was preempted between claim and
//!   publish (a few instructions).
//! - **Drop**: values still in the ring when the last handle goes are dropped with it, each once:
//!   dropping goes by the slots' stamps, not by the positions claimed.
//!
//! ## Positions and stamps
//!
//! Every claim takes the next *position* `p` (0, 1, 2, …) and lands in slot `p % capacity`.
//! Counters and stamps count in units of two, so that bit 0 is free for a flag:
//!
//! - `tail` = `2 × next position to claim`, `| MARK` once closed;
//! - `head` = `2 × next position to pop`;
//! - a slot's stamp = `2p | FULL` once position `p`'s value is published, and stays so after the
//!   value is popped, until position `p + capacity`'s value replaces it (`2 × index`, without
//!   `FULL`, before the slot's first value). The slot holds a value to pop exactly when its stamp
//!   is `2p | FULL` with `p` at or past `head`.
//! - producers may write position `p` once `p < head + capacity`; they read `head` through
//!   `seen_head`, the newest value of it any producer has loaded, and load `head` itself only when
//!   that says the ring is full, so a producer keeping up does not pull the consumer's line at
//!   every claim.
//!
//! All arithmetic wraps; positions are compared by wrapping distance, which stays correct as long
//! as no producer stalls for 2⁶² pushes (2³⁰ on 32-bit targets) between loading the tail and
//! claiming.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::time::Instant;
use std::{fmt, ptr};

use crossbeam_utils::CachePadded;

use super::wait::{Poll, Pollable, Sleeper, SleepingConsumer, WaitOutcome, WaitStrategy};
use crate::sync::Ordering::{Acquire, Relaxed, Release};
use crate::sync::{Arc, AtomicUsize, UnsafeCell};

/// One position, in the units `head`, `tail` and stamps count in.
const ONE: usize = 2;
/// Bit 0 of `tail`: set once, by `close`, never cleared.
const MARK: usize = 1;
/// Bit 0 of a slot's stamp: the value of the position in the other bits was written there (and may
/// have been popped since, if that position is below `head`).
const FULL: usize = 1;

/// Creates a ring of `capacity` slots and returns its two ends.
///
/// # Panics
///
/// If `capacity` is not a power of two, is less than 2, or exceeds 2⁶⁰ (2²⁸ on 32-bit targets).
/// The broker's builder validates user input before calling this.
pub fn ring<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(
        capacity >= 2 && capacity.is_power_of_two() && capacity <= MAX_CAPACITY,
        "a ring's capacity must be a power of two between 2 and {MAX_CAPACITY}; got {capacity}"
    );
    let slots = (0..capacity)
        .map(|index| Slot {
            stamp: AtomicUsize::new(index * ONE),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        })
        .collect();
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        seen_head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        sleeper: Sleeper::new(),
        slots,
        mask: capacity - 1,
    });
    (Producer { shared: Arc::clone(&shared) }, Consumer { shared, head: 0 })
}

/// The largest capacity: keeps every wrapping distance between live stamps below `isize::MAX / 4`.
const MAX_CAPACITY: usize = 1 << (usize::BITS - 4);

/// Why [`Producer::try_push`] handed its value back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PushError<T> {
    /// `capacity` values are waiting for the consumer; the ring is unchanged.
    Full(T),
    /// The ring is closed; it accepts nothing more.
    Closed(T),
}

impl<T> PushError<T> {
    /// The value that was not pushed.
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(value) | Self::Closed(value) => value,
        }
    }
}

// Like crossbeam's `TrySendError`: printable whatever `T` is.
impl<T> fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full(_) => "Full(..)",
            Self::Closed(_) => "Closed(..)",
        })
    }
}

/// Why [`Producer::try_push_batch`] took nothing; the values stay with the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushBatchError {
    /// `capacity` values are waiting for the consumer.
    Full,
    /// The ring is closed.
    Closed,
}

struct Slot<T> {
    /// `2p | FULL` once position `p`'s value is written, kept after it is popped until the next
    /// lap's value replaces it; `2 × index` before the first.
    stamp: AtomicUsize,
    /// Initialised exactly while `stamp` is `2p | FULL` for a position `p` at or past `head`
    /// (a value published and not yet popped).
    value: UnsafeCell<MaybeUninit<T>>,
}

impl<T> Slot<T> {
    /// Writes position `claimed`'s value and publishes it to the consumer.
    ///
    /// # Safety
    ///
    /// The caller claimed position `claimed` (won the tail CAS from or past it) and saw it below
    /// `head + capacity` (loaded with Acquire, directly or through `seen_head`): the consumer has
    /// read the slot's previous value and will not touch the slot until the stamp below.
    #[inline]
    unsafe fn publish(&self, claimed: usize, value: T) {
        debug_assert_ne!(self.stamp.load(Relaxed), claimed | FULL, "publishing into a slot that is not free");
        // SAFETY: the caller's claim makes this the only access to the slot (see the contract).
        self.value.with_mut(|slot| unsafe { slot.write(MaybeUninit::new(value)) });
        // Release: pairs with the Acquire load in `Consumer::take`, which then reads the value.
        self.stamp.store(claimed | FULL, Release);
    }
}

/// The state both ends share.
struct Shared<T> {
    /// `2 × next position to pop`. Written only by the consumer, after reading every value below
    /// it; read by producers when `seen_head` says the ring is full, and by `len`.
    head: CachePadded<AtomicUsize>,
    /// A value `head` had, at most its current one: the newest a producer has loaded. Producers
    /// check for room against it, so that they load `head` (the consumer's line, written once a
    /// batch) only about once a lap.
    seen_head: CachePadded<AtomicUsize>,
    /// `2 × next position to claim`, `| MARK` once closed. Producers CAS it to claim; `close`
    /// sets `MARK` with `fetch_or`, after which every claim's CAS fails.
    tail: CachePadded<AtomicUsize>,
    /// The consumer's sleep announcement; on its own cache line.
    sleeper: Sleeper,
    slots: Box<[Slot<T>]>,
    /// `capacity - 1`.
    mask: usize,
}

// SAFETY: the slots' values move from producers to the consumer (so `T: Send`), each accessed by
// one thread at a time as the stamps dictate; everything else is atomic or `Sleeper` (`Sync`).
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// The stamp distance between two positions that share a slot.
    fn lap(&self) -> usize {
        self.capacity() * ONE
    }

    fn slot(&self, stamp: usize) -> &Slot<T> {
        &self.slots[(stamp / ONE) & self.mask]
    }

    /// How many positions from `tail` (MARK cleared) on are free to claim, those below
    /// `head + capacity`, or `None` if `tail` is stale (behind `head`). Counts from `seen_head`,
    /// and loads `head` only when that leaves fewer than `want`.
    fn free_from(&self, tail: usize, want: usize) -> Option<usize> {
        // Acquire: pairs with the Release store below, made by a producer that loaded `head` with
        // Acquire: the consumer's reads of the values below it happen before our writes.
        let seen = self.seen_head.load(Acquire);
        let free = self.free_between(tail, seen);
        if free.is_some_and(|free| free >= want) {
            return free;
        }
        // Acquire: pairs with the Release store in `Consumer::publish_head`: every value below
        // `head` has been read, so positions up to `head + capacity` are free.
        let head = self.head.load(Acquire);
        if head != seen {
            // Release: pairs with the Acquire load above. Racing producers may store an older
            // value over a newer one; any value `head` had is a safe (if stale) bound.
            self.seen_head.store(head, Release);
        }
        self.free_between(tail, head)
    }

    /// Free positions from `tail` on with the consumer at `head`; `None` if `tail` is behind it.
    fn free_between(&self, tail: usize, head: usize) -> Option<usize> {
        let used = distance(tail, head);
        #[allow(clippy::cast_sign_loss, reason = "0 ≤ used")]
        (used >= 0).then(|| self.lap().saturating_sub(used as usize) / ONE)
    }

    fn close(&self) -> bool {
        // Relaxed: only the atomicity matters: every claim CAS is ordered before this in `tail`'s
        // modification order (and counted in the final tail) or after it (and fails on MARK).
        let previous = self.tail.fetch_or(MARK, Relaxed);
        if let Some(consumer) = self.sleeper.check_after_claim() {
            consumer.unpark();
        }
        previous & MARK == 0
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Relaxed, all: `&mut self`; every handle is gone, and `Arc`'s drop ordered their accesses
        // before this one.
        let head = self.head.load(Relaxed);
        // One lap from `head` visits every slot once, oldest value first. A slot is dropped only
        // if its stamp says it holds that position's value: a position claimed and never written
        // (a `Reservation` forgotten instead of dropped) holds nothing, or the bytes of a value
        // popped a lap earlier, and its stamp is older.
        for offset in 0..self.capacity() {
            let position = head.wrapping_add(offset * ONE);
            let slot = self.slot(position);
            if slot.stamp.load(Relaxed) == position | FULL {
                // `position` is at or past `head`, so the value was never popped (`Slot::value`).
                // SAFETY: that value is initialised, and `&mut self` makes this the last access.
                slot.value.with_mut(|value| unsafe { (*value).assume_init_drop() });
            }
        }
    }
}

/// Wrapping distance from `b` to `a`, signed.
#[inline]
fn distance(a: usize, b: usize) -> isize {
    // Reinterpreting the wrapped difference is the point: live stamps are within `isize::MAX / 4`
    // of each other (`MAX_CAPACITY`).
    #[allow(clippy::cast_possible_wrap, reason = "wrapping distance")]
    let distance = a.wrapping_sub(b) as isize;
    distance
}

/// The publishing end of a ring; clone it for every publisher thread.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Producer<T> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl<T: Send> Producer<T> {
    /// Pushes `value`, or hands it back if the ring is full or closed. Never blocks; wakes the
    /// consumer if it is parked.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] if `capacity` values are waiting, [`PushError::Closed`] if the ring is
    /// closed; either carries `value` back.
    pub fn try_push(&self, value: T) -> Result<(), PushError<T>> {
        let claim = match self.shared.claim(1) {
            Ok(claim) => claim,
            Err(PushBatchError::Full) => return Err(PushError::Full(value)),
            Err(PushBatchError::Closed) => return Err(PushError::Closed(value)),
        };
        // SAFETY: we claimed `claim.first`, below `head + capacity`.
        unsafe { self.shared.slot(claim.first).publish(claim.first, value) };
        if let Some(consumer) = claim.sleeping {
            consumer.unpark();
        }
        Ok(())
    }

    /// Pushes as many values from the front of `values` as there are free slots, claiming them
    /// all with one CAS, and returns how many it took (all of them unless the ring filled up;
    /// 0 only if `values` is empty). The taken values come out contiguous and in order.
    ///
    /// # Errors
    ///
    /// [`PushBatchError::Full`] if not one slot is free, [`PushBatchError::Closed`] if the ring is
    /// closed; `values` is then unchanged.
    pub fn try_push_batch(&self, values: &mut VecDeque<T>) -> Result<usize, PushBatchError> {
        if values.is_empty() {
            return Ok(0);
        }
        let claim = self.shared.claim(values.len())?;
        for (offset, value) in values.drain(..claim.count).enumerate() {
            let claimed = claim.first.wrapping_add(offset * ONE);
            // SAFETY: we claimed `claimed`, and it is below `head + capacity`.
            unsafe { self.shared.slot(claimed).publish(claimed, value) };
        }
        if let Some(consumer) = claim.sleeping {
            consumer.unpark();
        }
        Ok(claim.count)
    }
}

impl<T: Send + Default> Producer<T> {
    /// Claims up to `want` consecutive slots (at least one) with one CAS, for values written
    /// later by [`Reservation::commit`]: the first phase of a two-phase publish. The consumer
    /// cannot pass a reserved slot until it is committed, so commit promptly and do nothing that
    /// blocks in between; a reservation dropped uncommitted fills its slots with `T::default()`,
    /// which the consumer then pops. A reservation *forgotten* (`mem::forget`, an `Rc` cycle)
    /// publishes nothing and stalls the consumer at its first slot for good, which is why this is
    /// crate-private (loom builds hand it to the models through `__private::try_reserve`). The
    /// ring stays sound even then: its drop skips the unwritten slots.
    ///
    /// # Errors
    ///
    /// [`PushBatchError::Full`] if not one slot is free, [`PushBatchError::Closed`] if the ring is
    /// closed.
    pub(crate) fn try_reserve(&self, want: usize) -> Result<Reservation<'_, T>, PushBatchError> {
        let claim = self.shared.claim(want.max(1))?;
        let end = claim.first.wrapping_add(claim.count * ONE);
        Ok(Reservation { shared: &self.shared, next: claim.first, end, sleeping: claim.sleeping })
    }
}

/// Consecutive ring slots claimed by [`Producer::try_reserve`] and not yet written.
pub struct Reservation<'a, T: Send + Default> {
    shared: &'a Shared<T>,
    /// Stamp of the next position to write.
    next: usize,
    /// Stamp one past the last position claimed.
    end: usize,
    /// The consumer, when it was asleep at the claim: woken once the values are published.
    sleeping: Option<SleepingConsumer<'a>>,
}

impl<T: Send + Default> Reservation<'_, T> {
    /// How many slots are reserved.
    pub(crate) fn len(&self) -> usize {
        usize::try_from(distance(self.end, self.next)).unwrap_or(0) / ONE
    }

    /// Writes `values` into the reserved slots, in order, and publishes them. Values beyond
    /// [`len`](Self::len) are not taken; slots left over get `T::default()`.
    pub fn commit(mut self, values: impl IntoIterator<Item = T>) {
        for value in values.into_iter().take(self.len()) {
            self.publish_next(value);
        }
    }

    /// [`commit`](Self::commit) of one value: written straight into its slot, where an iterator's
    /// state would carry it through the stack first.
    pub fn commit_one(mut self, value: T) {
        if self.next != self.end {
            self.publish_next(value);
        }
    }

    /// Publishes `value` at the next reserved position, which the caller has checked is one.
    fn publish_next(&mut self, value: T) {
        debug_assert_ne!(self.next, self.end, "a reserved position is left");
        // SAFETY: `next` is a position this reservation claimed and has not written.
        unsafe { self.shared.slot(self.next).publish(self.next, value) };
        self.next = self.next.wrapping_add(ONE);
    }
}

impl<T: Send + Default> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        while self.next != self.end {
            self.publish_next(T::default());
        }
        if let Some(consumer) = self.sleeping.take() {
            consumer.unpark();
        }
    }
}

impl<T: Send + Default> fmt::Debug for Reservation<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation").field("len", &self.len()).finish_non_exhaustive()
    }
}

/// Consecutive positions claimed with one CAS.
struct Claim<'a> {
    /// Stamp of the first position.
    first: usize,
    count: usize,
    sleeping: Option<SleepingConsumer<'a>>,
}

impl<T> Shared<T> {
    /// Claims up to `want` (≥ 1) consecutive positions with one CAS on the tail.
    fn claim(&self, want: usize) -> Result<Claim<'_>, PushBatchError> {
        // Relaxed: a guess, checked by the CAS.
        let mut tail = self.tail.load(Relaxed);
        loop {
            if tail & MARK != 0 {
                return Err(PushBatchError::Closed);
            }
            let Some(free) = self.free_from(tail, want) else {
                // The consumer is past our `tail`: it is stale.
                // Relaxed: a guess, as above.
                tail = self.tail.load(Relaxed);
                continue;
            };
            let count = free.min(want);
            if count == 0 {
                return Err(PushBatchError::Full);
            }
            // Relaxed: the claim needs only atomicity; the slots' contents are ordered by their
            // stamps and `head`, and the sleeping check by the fence in `check_after_claim`.
            match self.tail.compare_exchange_weak(tail, tail.wrapping_add(count * ONE), Relaxed, Relaxed) {
                Ok(_) => {
                    let sleeping = self.sleeper.check_after_claim();
                    return Ok(Claim { first: tail, count, sleeping });
                }
                Err(current) => tail = current,
            }
        }
    }
}

impl<T> Producer<T> {
    /// How many values are waiting (claimed and not yet popped); a snapshot for gauges, possibly
    /// stale by the time it returns.
    pub fn len(&self) -> usize {
        // Relaxed, both: a gauge, not a synchronisation point; the two loads are not one
        // snapshot, hence the clamp.
        let head = self.shared.head.load(Relaxed);
        let tail = self.shared.tail.load(Relaxed) & !MARK;
        let claimed = usize::try_from(distance(tail, head)).unwrap_or(0) / ONE;
        claimed.min(self.capacity())
    }

    /// Whether [`len`](Self::len) is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions claimed since the ring was made (wrapping): every value accepted so far, popped
    /// or not, plus claims still being written. What `Broker::drain` counts down to.
    pub fn claimed(&self) -> usize {
        // Relaxed: a claim that happened before the caller's call is visible by coherence; later
        // ones may or may not be counted, which is what "so far" means.
        (self.shared.tail.load(Relaxed) & !MARK) / ONE
    }

    /// Whether every slot is claimed (a snapshot, like [`len`](Self::len)).
    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity()
    }

    /// The number of slots, as given to [`ring`].
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the ring is closed (a snapshot; once `true`, always `true`).
    pub fn is_closed(&self) -> bool {
        // Relaxed: a snapshot; MARK is never cleared.
        self.shared.tail.load(Relaxed) & MARK != 0
    }

    /// Closes the ring: later pushes fail with `Closed`, and the consumer, woken if parked, drains
    /// what was accepted. Returns whether this call closed it (`false`: it already was).
    pub fn close(&self) -> bool {
        self.shared.close()
    }

    #[cfg(all(test, not(eventbroker_loom)))]
    pub(crate) fn shared_sleeper(&self) -> &Sleeper {
        &self.shared.sleeper
    }
}

/// The draining end of a ring: exactly one, owned by the shard's worker. Dropping it closes the
/// ring.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// `2 × next position to pop`; `shared.head` lags it until `publish_head`.
    head: usize,
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").field("capacity", &self.shared.capacity()).finish_non_exhaustive()
    }
}

impl<T> Consumer<T> {
    /// Pops the oldest value, if it is published.
    pub fn pop(&mut self) -> Option<T> {
        let value = self.take()?;
        self.publish_head();
        Some(value)
    }

    /// Pops up to `max` consecutive published values onto `out`, in order, publishing the new head
    /// once; returns how many.
    pub fn pop_batch(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let mut taken = 0;
        while taken < max {
            let Some(value) = self.take() else { break };
            out.push(value);
            taken += 1;
        }
        if taken > 0 {
            self.publish_head();
        }
        taken
    }

    /// Waits, by `strategy`, until a value is ready, the ring is closed and drained, or
    /// `deadline` passes. Spurious wake-ups are absorbed.
    ///
    /// # Panics
    ///
    /// If a consumer that has parked once waits on another thread (producers unpark the first).
    pub fn wait(&mut self, strategy: WaitStrategy, deadline: Option<Instant>) -> WaitOutcome {
        // SAFETY: `&mut self`: this is the ring's only consumer, waiting on one thread at a time,
        // and the sleeper is its ring's.
        unsafe { strategy.wait(&self.shared.sleeper, deadline, &*self) }
    }

    /// Waits as [`Consumer::wait`] does, and also returns [`WaitOutcome::Ready`] once `also()`
    /// holds: for a consumer with work that does not come through the ring, whose makers make
    /// `also()` hold and then wake it with a [`Nudge`] (`also` is the consumer's Dekker read for
    /// them, as the tail is for producers).
    pub(crate) fn wait_or(
        &mut self,
        strategy: WaitStrategy,
        deadline: Option<Instant>,
        also: impl Fn() -> bool,
    ) -> WaitOutcome {
        let either = Either { ring: &*self, also };
        // SAFETY: as in `wait`.
        unsafe { strategy.wait(&self.shared.sleeper, deadline, &either) }
    }

    /// A handle that wakes this consumer from [`Consumer::wait_or`].
    pub(crate) fn nudge(&self) -> Nudge<T> {
        Nudge(Arc::clone(&self.shared))
    }

    /// Closes the ring, as [`Producer::close`] does.
    pub fn close(&self) -> bool {
        self.shared.close()
    }

    /// Whether the ring is closed (a snapshot; once `true`, always `true`), drained or not.
    pub fn is_closed(&self) -> bool {
        // Relaxed: a snapshot; MARK is never cleared.
        self.shared.tail.load(Relaxed) & MARK != 0
    }

    /// Whether the ring is closed and every value it accepted has been popped.
    pub fn is_drained(&self) -> bool {
        self.poll() == Poll::Closed
    }

    /// The number of slots, as given to [`ring`].
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Takes the value at `head` if it is published, frees its slot, and advances the local head.
    #[inline]
    fn take(&mut self) -> Option<T> {
        let slot = self.shared.slot(self.head);
        // Acquire: pairs with the Release store in `Slot::publish`, so its value write happens
        // before our read.
        if slot.stamp.load(Acquire) != self.head | FULL {
            return None;
        }
        // Only the consumer takes, and no producer writes the slot before `publish_head`.
        // SAFETY: the stamp says the slot holds position `head`'s value, initialised.
        let value = slot.value.with(|value| unsafe { ptr::read(value).assume_init() });
        self.head = self.head.wrapping_add(ONE);
        Some(value)
    }

    fn publish_head(&self) {
        // Release: pairs with the Acquire load in `Shared::free_from`: every value below `head`
        // has been read, and producers may write the next lap's values into their slots.
        self.shared.head.store(self.head, Release);
    }
}

impl<T> Pollable for Consumer<T> {
    fn is_ready(&self) -> bool {
        // Relaxed: a peek; `take` loads the stamp again with Acquire before touching the value.
        self.shared.slot(self.head).stamp.load(Relaxed) == self.head | FULL
    }

    /// Loads the tail unless a value is ready.
    fn poll(&self) -> Poll {
        if self.is_ready() {
            return Poll::Ready;
        }
        // Relaxed: in the park handshake the SeqCst fences order this load (see `wait`); else
        // it is a snapshot, and a final one once MARK is set (the tail never moves again).
        let tail = self.shared.tail.load(Relaxed);
        match (tail & !MARK == self.head, tail & MARK != 0) {
            (true, true) => Poll::Closed,
            (true, false) => Poll::Empty,
            (false, _) => Poll::Pending,
        }
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// The ring seen by [`Consumer::wait_or`]: ready when a value is, or when `also()` holds.
struct Either<'a, T, F> {
    ring: &'a Consumer<T>,
    also: F,
}

impl<T, F: Fn() -> bool> Pollable for Either<'_, T, F> {
    fn is_ready(&self) -> bool {
        self.ring.is_ready() || (self.also)()
    }

    fn poll(&self) -> Poll {
        if (self.also)() { Poll::Ready } else { self.ring.poll() }
    }
}

/// Wakes a ring's consumer waiting in [`Consumer::wait_or`], for work that does not come through
/// the ring. Make the consumer's `also()` hold first, then call [`Nudge::wake`].
pub(crate) struct Nudge<T>(Arc<Shared<T>>);

impl<T> Nudge<T> {
    /// Unparks the consumer if it announced a sleep. Its `SeqCst` fence, after the caller's store
    /// that makes `also()` hold, is the producer half of the park handshake (see
    /// [`Sleeper::check_after_claim`]): either the consumer's last look sees that store, or this
    /// sees it sleeping.
    pub(crate) fn wake(&self) {
        if let Some(consumer) = self.0.sleeper.check_after_claim() {
            consumer.unpark();
        }
    }
}

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;

    use super::*;

    #[test]
    #[should_panic(expected = "power of two")]
    fn capacity_must_be_a_power_of_two() {
        let _ = ring::<u8>(3);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn capacity_must_be_at_least_two() {
        let _ = ring::<u8>(1);
    }

    #[test]
    fn full_and_closed_hand_the_value_back() {
        let (producer, mut consumer) = ring::<String>(2);
        producer.try_push("a".into()).unwrap();
        producer.try_push("b".into()).unwrap();
        assert_eq!(producer.try_push("c".into()), Err(PushError::Full("c".into())));
        assert_eq!(producer.len(), 2);
        assert_eq!(consumer.pop().as_deref(), Some("a"));
        producer.try_push("c".into()).unwrap();
        assert!(producer.close());
        assert!(!consumer.close(), "closing twice reports the first close");
        assert_eq!(producer.try_push("d".into()).map_err(PushError::into_inner), Err("d".to_owned()));
        assert!(!consumer.is_drained());
        let mut out = Vec::new();
        assert_eq!(consumer.pop_batch(&mut out, 8), 2);
        assert_eq!(out, ["b", "c"]);
        assert!(consumer.is_drained());
    }

    #[test]
    fn a_batch_takes_what_fits() {
        let (producer, mut consumer) = ring::<u32>(4);
        producer.try_push(0).unwrap();
        let mut values: VecDeque<u32> = (1..=5).collect();
        assert_eq!(producer.try_push_batch(&mut values), Ok(3));
        assert_eq!(values, [4, 5]);
        assert_eq!(producer.try_push_batch(&mut values), Err(PushBatchError::Full));
        assert_eq!(values, [4, 5]);
        let mut out = Vec::new();
        assert_eq!(consumer.pop_batch(&mut out, 2), 2);
        assert_eq!(producer.try_push_batch(&mut values), Ok(2));
        assert_eq!(consumer.pop_batch(&mut out, usize::MAX), 4);
        assert_eq!(out, [0, 1, 2, 3, 4, 5]);
        assert_eq!(producer.try_push_batch(&mut VecDeque::new()), Ok(0));
        producer.close();
        assert_eq!(producer.try_push_batch(&mut values), Ok(0), "an empty batch is a no-op");
        values.push_back(6);
        assert_eq!(producer.try_push_batch(&mut values), Err(PushBatchError::Closed));
    }

    #[test]
    fn a_reservation_dropped_uncommitted_fills_its_slots_with_defaults() {
        let (producer, mut consumer) = ring::<Option<u32>>(4);
        let reservation = producer.try_reserve(3).unwrap();
        assert_eq!(reservation.len(), 3);
        assert_eq!(consumer.pop(), None, "the consumer waits at a reserved slot");
        drop(reservation);
        let mut out = Vec::new();
        assert_eq!(consumer.pop_batch(&mut out, 8), 3);
        assert_eq!(out, [None, None, None]);
        producer.try_reserve(2).unwrap().commit([Some(1)]);
        assert_eq!(consumer.pop(), Some(Some(1)));
        assert_eq!(consumer.pop(), Some(None), "a short commit fills the rest");
    }

    #[test]
    fn a_parked_consumer_is_woken_by_a_commit() {
        let (producer, mut consumer) = ring::<Option<u32>>(4);
        let waiter = std::thread::spawn(move || {
            let outcome = consumer
                .wait(WaitStrategy::default(), Some(Instant::now() + std::time::Duration::from_secs(30)));
            (outcome, consumer.pop())
        });
        while !producer.shared.sleeper.is_sleeping() {
            std::thread::yield_now();
        }
        producer.try_reserve(1).unwrap().commit([Some(7)]);
        assert_eq!(waiter.join().unwrap(), (WaitOutcome::Ready, Some(Some(7))));
    }

    #[test]
    fn dropping_the_consumer_closes_the_ring() {
        let (producer, consumer) = ring::<u32>(2);
        drop(consumer);
        assert!(producer.is_closed());
        assert_eq!(producer.try_push(1), Err(PushError::Closed(1)));
    }

    /// Counts its drops in a shared counter.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn dropping_the_ring_drops_what_is_left() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (producer, mut consumer) = ring::<Counted>(4);
        // Wrap around once so that the leftovers straddle the end of the buffer.
        for _ in 0..3 {
            producer.try_push(Counted(Arc::clone(&drops))).unwrap();
        }
        assert_eq!(consumer.pop_batch(&mut Vec::new(), 3), 3);
        assert_eq!(drops.load(Ordering::Relaxed), 3);
        for _ in 0..3 {
            producer.try_push(Counted(Arc::clone(&drops))).unwrap();
        }
        drop(consumer.pop());
        assert_eq!(drops.load(Ordering::Relaxed), 4);
        drop(consumer);
        assert_eq!(drops.load(Ordering::Relaxed), 4, "the producer still holds the ring");
        let Err(PushError::Closed(refused)) = producer.try_push(Counted(Arc::clone(&drops))) else {
            panic!("the ring should be closed");
        };
        drop(refused);
        assert_eq!(drops.load(Ordering::Relaxed), 5);
        drop(producer);
        assert_eq!(drops.load(Ordering::Relaxed), 7);
    }

    /// A reservation that is forgotten, not dropped, leaves its slots claimed and unwritten, with
    /// the bytes of values popped a lap earlier still in them: dropping the ring must skip them.
    #[test]
    fn a_forgotten_reservation_leaves_the_ring_sound_to_drop() {
        let drops = Arc::new(AtomicUsize::new(0));
        let counted = || Some(Counted(Arc::clone(&drops)));
        let (producer, mut consumer) = ring::<Option<Counted>>(4);
        for _ in 0..4 {
            producer.try_push(counted()).unwrap();
        }
        assert_eq!(consumer.pop_batch(&mut Vec::new(), 4), 4);
        assert_eq!(drops.load(Ordering::Relaxed), 4);
        producer.try_push(counted()).unwrap();
        std::mem::forget(producer.try_reserve(2).unwrap());
        producer.try_push(counted()).unwrap();
        assert!(consumer.pop().is_some_and(|value| value.is_some()));
        assert_eq!(drops.load(Ordering::Relaxed), 5);
        assert!(consumer.pop().is_none(), "the consumer waits at the forgotten slot");
        drop(consumer);
        drop(producer);
        assert_eq!(drops.load(Ordering::Relaxed), 6, "each value dropped once, and only values");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u16),
        PushBatch(Vec<u16>),
        /// Reserve up to `want` slots, then commit `values` (slots beyond them get the default).
        Reserve {
            want: usize,
            values: Vec<u16>,
        },
        Pop,
        PopBatch(usize),
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<u16>().prop_map(Op::Push),
            3 => proptest::collection::vec(any::<u16>(), 0..10).prop_map(Op::PushBatch),
            3 => (0..10usize, proptest::collection::vec(1..u16::MAX, 0..10))
                .prop_map(|(want, values)| Op::Reserve { want, values }),
            6 => Just(Op::Pop),
            3 => (0..10usize).prop_map(Op::PopBatch),
            1 => Just(Op::Close),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The ring against a `VecDeque` of the same capacity, one thread, many laps.
        #[test]
        fn behaves_like_a_bounded_deque(
            capacity_log2 in 1u32..4,
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let capacity = 1 << capacity_log2;
            let (producer, mut consumer) = ring::<u16>(capacity);
            let mut model = VecDeque::new();
            let mut closed = false;
            for op in ops {
                match op {
                    Op::Push(value) => {
                        let expected = if closed {
                            Err(PushError::Closed(value))
                        } else if model.len() == capacity {
                            Err(PushError::Full(value))
                        } else {
                            model.push_back(value);
                            Ok(())
                        };
                        prop_assert_eq!(producer.try_push(value), expected);
                    }
                    Op::PushBatch(values) => {
                        let mut batch: VecDeque<u16> = values.iter().copied().collect();
                        let fits = (capacity - model.len()).min(values.len());
                        let expected = if values.is_empty() {
                            Ok(0)
                        } else if closed {
                            Err(PushBatchError::Closed)
                        } else if fits == 0 {
                            Err(PushBatchError::Full)
                        } else {
                            model.extend(&values[..fits]);
                            Ok(fits)
                        };
                        prop_assert_eq!(producer.try_push_batch(&mut batch), expected);
                        let taken = expected.unwrap_or(0);
                        prop_assert_eq!(batch, &values[taken..]);
                    }
                    Op::Reserve { want, values } => {
                        let fits = (capacity - model.len()).min(want.max(1));
                        match producer.try_reserve(want) {
                            Ok(reservation) => {
                                prop_assert!(!closed && fits > 0);
                                prop_assert_eq!(reservation.len(), fits);
                                model.extend(values.iter().copied().chain(std::iter::repeat(0)).take(fits));
                                reservation.commit(values);
                            }
                            Err(error) => {
                                let expected = if closed { PushBatchError::Closed } else { PushBatchError::Full };
                                prop_assert_eq!(error, expected);
                                prop_assert!(closed || fits == 0);
                            }
                        }
                    }
                    Op::Pop => prop_assert_eq!(consumer.pop(), model.pop_front()),
                    Op::PopBatch(max) => {
                        let mut out = vec![7];
                        let taken = consumer.pop_batch(&mut out, max);
                        let expected: Vec<u16> = model.drain(..max.min(model.len())).collect();
                        prop_assert_eq!(taken, expected.len());
                        prop_assert_eq!(&out[1..], &expected[..]);
                    }
                    Op::Close => {
                        prop_assert_eq!(producer.close(), !closed);
                        closed = true;
                    }
                }
                prop_assert_eq!(producer.len(), model.len());
                prop_assert_eq!(producer.is_closed(), closed);
                prop_assert_eq!(consumer.is_drained(), closed && model.is_empty());
                let outcome = consumer.wait(WaitStrategy::BusySpin, Some(Instant::now()));
                let expected = match (model.is_empty(), closed) {
                    (false, _) => WaitOutcome::Ready,
                    (true, true) => WaitOutcome::Closed,
                    (true, false) => WaitOutcome::TimedOut,
                };
                prop_assert_eq!(outcome, expected);
            }
        }
    }
}
