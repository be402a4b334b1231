//! One shard's entries in the order they were stored: a ring of slots addressed by a position that
//! only grows, the oldest live entry at the tail, the next store at the head.
//!
//! The memory provider evicts the least recently used event, and counts only stores and `get` as
//! use; the broker stores each event once and never reads it back. So in the common flow the
//! recency order is the store order, and a ring written at its head and evicted at its tail keeps
//! it with no links at all: a store writes the next slot, an eviction takes the oldest, both in
//! memory the one before touched. A use moves its entry to the head (taken out, pushed again),
//! leaving a hole that eviction steps over. When the ring is full, [`Log::rebuild`] places the live
//! entries again, in order, at the start of a ring of the same size (when holes are at least half
//! of it) or of twice the size; the caller moves whatever it keeps by slot.

/// How far ahead of the head and the tail [`Log::prefetch_ahead`] reaches.
const SLOTS_AHEAD: u64 = 8;

/// A ring of `T` in the order pushed.
pub(super) struct Log<T> {
    /// `capacity` slots, a power of two, or none before the first push; position `p` lives in slot
    /// `p & (capacity - 1)`. Only positions in `tail..head` hold values.
    slots: Box<[Option<T>]>,
    /// The position of the next push.
    head: u64,
    /// The position of the oldest value, or `head` when empty.
    tail: u64,
    len: usize,
}

impl<T> Log<T> {
    pub(super) fn new() -> Self {
        Self { slots: Box::default(), head: 0, tail: 0, len: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Whether a push needs a [`Log::rebuild`] first: every slot from the tail to the head is
    /// taken, by a value or a hole.
    pub(super) fn is_full(&self) -> bool {
        self.head - self.tail == self.slots.len() as u64
    }

    /// The position of the next push.
    pub(super) fn head(&self) -> u64 {
        self.head
    }

    fn slot_of(&self, position: u64) -> usize {
        #[allow(clippy::cast_possible_truncation, reason = "masked below the capacity, a usize")]
        let slot = position as usize & (self.slots.len() - 1);
        slot
    }

    /// Pushes `value` as the newest; returns its slot.
    ///
    /// # Panics
    /// When the log is full (see [`Log::is_full`]).
    pub(super) fn push(&mut self, value: T) -> usize {
        assert!(!self.is_full(), "pushing into a full log");
        let slot = self.slot_of(self.head);
        debug_assert!(self.slots[slot].is_none(), "the head's slot is free");
        self.slots[slot] = Some(value);
        self.head += 1;
        self.len += 1;
        slot
    }

    /// Takes the value in `slot` out, leaving a hole.
    ///
    /// # Panics
    /// When `slot` holds no value: the caller's index is out of step, a bug.
    pub(super) fn take(&mut self, slot: usize) -> T {
        let value = self.slots[slot].take().expect("taking from an empty slot");
        self.len -= 1;
        // The tail moves on over the holes to the next value.
        while self.tail < self.head && self.slots[self.slot_of(self.tail)].is_none() {
            self.tail += 1;
        }
        value
    }

    /// The oldest value's position and slot.
    pub(super) fn oldest(&self) -> Option<(u64, usize)> {
        (self.len > 0).then(|| (self.tail, self.slot_of(self.tail)))
    }

    /// Brings into cache the slots the pushes and evictions a few steps on will touch: the head's
    /// and the tail's, [`SLOTS_AHEAD`] positions on, each last touched a ring's length of pushes
    /// ago. The hardware's own prefetcher does not follow a walk this slow.
    pub(super) fn prefetch_ahead(&self) {
        if self.slots.is_empty() {
            return;
        }
        for position in [self.head, self.tail] {
            let slot = self.slot_of(position + SLOTS_AHEAD);
            let address = std::ptr::from_ref(&self.slots[slot]).cast::<u8>();
            crate::prefetch::range(address, size_of::<Option<T>>());
        }
    }

    /// The slot of the value pushed next after the one at `position`, looking past a few holes at
    /// most: for prefetching.
    pub(super) fn after(&self, position: u64) -> Option<(u64, usize)> {
        (position + 1..self.head.min(position + 4))
            .map(|p| (p, self.slot_of(p)))
            .find(|&(_, slot)| self.slots[slot].is_some())
    }

    pub(super) fn get(&self, slot: usize) -> &T {
        self.slots[slot].as_ref().expect("reading an empty slot")
    }

    pub(super) fn get_mut(&mut self, slot: usize) -> &mut T {
        self.slots[slot].as_mut().expect("reading an empty slot")
    }

    /// Whether `slot` holds the newest value.
    pub(super) fn is_newest(&self, slot: usize) -> bool {
        self.head > self.tail && self.slot_of(self.head - 1) == slot
    }

    /// Every value with its position and slot, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, usize, &T)> {
        self.iter_from(self.tail)
    }

    /// The values from `position` on (or from the tail, if later), with their positions and slots,
    /// oldest first.
    pub(super) fn iter_from(&self, position: u64) -> impl Iterator<Item = (u64, usize, &T)> {
        (position.max(self.tail)..self.head).filter_map(|p| {
            let slot = self.slot_of(p);
            self.slots[slot].as_ref().map(|value| (p, slot, value))
        })
    }

    /// Places the values again, in order, from slot 0 of a ring of `capacity` slots (a power of
    /// two, above the values held): the holes between them close. Returns each value's former
    /// slot, in order: the value from `moved[i]` is now in slot `i`.
    ///
    /// # Panics
    /// When `capacity` is not a power of two or not above [`Log::len`].
    pub(super) fn rebuild(&mut self, capacity: usize) -> Vec<usize> {
        assert!(capacity.is_power_of_two() && capacity > self.len, "room for every value and one more");
        let mut slots: Box<[Option<T>]> = (0..capacity).map(|_| None).collect();
        let mut moved = Vec::with_capacity(self.len);
        for p in self.tail..self.head {
            let slot = self.slot_of(p);
            if let Some(value) = self.slots[slot].take() {
                slots[moved.len()] = Some(value);
                moved.push(slot);
            }
        }
        self.slots = slots;
        self.tail = 0;
        self.head = self.len as u64;
        moved
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::Log;

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        /// Takes the value and pushes it again: a use.
        Renew(usize),
        Take(usize),
        TakeOldest,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Push),
            2 => any::<usize>().prop_map(Op::Renew),
            1 => any::<usize>().prop_map(Op::Take),
            1 => Just(Op::TakeOldest),
        ]
    }

    /// Rebuilds as the memory provider's table does: in place when holes are half of it, else twice
    /// the size.
    fn make_room(log: &mut Log<u32>, model: &mut VecDeque<(u32, usize)>) {
        if log.is_full() {
            let capacity = match log.capacity() {
                0 => 4,
                c if log.len() * 2 <= c => c,
                c => c * 2,
            };
            let moved = log.rebuild(capacity);
            // In order: the model's `i`th value was in `moved[i]`, and is now in slot `i`.
            assert_eq!(moved, model.iter().map(|&(_, slot)| slot).collect::<Vec<_>>());
            for (new, entry) in model.iter_mut().enumerate() {
                entry.1 = new;
            }
        }
    }

    proptest! {
        /// The log agrees with a `VecDeque` model (back = newest) after any sequence of pushes,
        /// uses, takes and evictions, across rebuilds, in order and slot by slot.
        #[test]
        fn matches_a_vecdeque_model(ops in prop::collection::vec(op(), 0..400)) {
            let mut log = Log::new();
            let mut model: VecDeque<(u32, usize)> = VecDeque::new();
            let mut next = 0u32;
            let mut most = 1;
            for op in ops {
                match op {
                    Op::Push => {
                        make_room(&mut log, &mut model);
                        model.push_back((next, log.push(next)));
                        next += 1;
                    }
                    Op::Renew(i) if !model.is_empty() => {
                        make_room(&mut log, &mut model);
                        let (value, slot) = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(log.take(slot), value);
                        let slot = log.push(value);
                        prop_assert!(log.is_newest(slot));
                        model.push_back((value, slot));
                    }
                    Op::Take(i) if !model.is_empty() => {
                        let (value, slot) = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(log.take(slot), value);
                    }
                    Op::TakeOldest => {
                        let oldest = log.oldest().map(|(_, slot)| slot);
                        prop_assert_eq!(oldest, model.front().map(|&(_, slot)| slot));
                        if let Some((value, slot)) = model.pop_front() {
                            prop_assert_eq!(log.take(slot), value);
                        }
                    }
                    Op::Renew(_) | Op::Take(_) => {}
                }
                prop_assert_eq!(log.len(), model.len());
                let held: Vec<(u32, usize)> = log.iter().map(|(_, slot, &v)| (v, slot)).collect();
                prop_assert_eq!(&held, &model.iter().copied().collect::<Vec<_>>());
                for &(value, slot) in &model {
                    prop_assert_eq!(*log.get(slot), value);
                }
                if let Some((position, _)) = log.oldest() {
                    let next = log.after(position).map(|(_, slot)| *log.get(slot));
                    prop_assert!(next.is_none() || next == model.get(1).map(|&(v, _)| v));
                }
                most = most.max(model.len());
                prop_assert!(log.capacity() <= 4 * most, "grown only when over half full");
            }
        }
    }
}
