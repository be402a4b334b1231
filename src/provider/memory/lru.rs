//! A recency list over a slab: O(1) insert, touch, remove and pop of the least recently used, with
//! stable slot indices that the memory provider's indexes point at.

const NIL: usize = usize::MAX;

/// A line each (the memory provider's entries are at most 48 bytes): a store writes one node and
/// an eviction reads one, and neither then shares a line with a neighbour's.
#[repr(align(64))]
struct Node<T> {
    /// `None` while the slot is on the free list.
    value: Option<T>,
    /// Towards the most recently used end.
    prev: usize,
    /// Towards the least recently used end.
    next: usize,
}

/// Values in recency order. A slot index stays valid until its value is removed; after that the
/// slot is reused.
pub(super) struct Lru<T> {
    nodes: Vec<Node<T>>,
    free: Vec<usize>,
    /// Most recently used, or `NIL` when empty.
    head: usize,
    /// Least recently used, or `NIL` when empty.
    tail: usize,
    len: usize,
}

impl<T> Lru<T> {
    pub(super) const fn new() -> Self {
        Self { nodes: Vec::new(), free: Vec::new(), head: NIL, tail: NIL, len: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Inserts `value` as the most recently used; returns its slot.
    pub(super) fn push_front(&mut self, value: T) -> usize {
        let node = Node { value: Some(value), prev: NIL, next: NIL };
        let slot = if let Some(slot) = self.free.pop() {
            self.nodes[slot] = node;
            slot
        } else {
            self.nodes.push(node);
            self.nodes.len() - 1
        };
        self.link_front(slot);
        self.len += 1;
        slot
    }

    /// Marks `slot` as the most recently used.
    pub(super) fn touch(&mut self, slot: usize) {
        if self.head != slot {
            self.unlink(slot);
            self.link_front(slot);
        }
    }

    /// Removes the value in `slot`.
    ///
    /// # Panics
    /// When `slot` holds no value: the caller's index is out of step, a bug.
    pub(super) fn remove(&mut self, slot: usize) -> T {
        let value = self.nodes[slot].value.take().expect("removing an empty LRU slot");
        self.unlink(slot);
        self.free.push(slot);
        self.len -= 1;
        value
    }

    /// The least recently used slot.
    pub(super) fn back(&self) -> Option<usize> {
        (self.tail != NIL).then_some(self.tail)
    }

    pub(super) fn get(&self, slot: usize) -> &T {
        self.nodes[slot].value.as_ref().expect("reading an empty LRU slot")
    }

    /// Every value with its slot, in slot order.
    pub(super) fn iter_slots(&self) -> impl Iterator<Item = (usize, &T)> {
        self.nodes.iter().enumerate().filter_map(|(slot, node)| node.value.as_ref().map(|v| (slot, v)))
    }

    /// The slot used next more recently than `slot`: the one evicted after it.
    pub(super) fn newer(&self, slot: usize) -> Option<usize> {
        let prev = self.nodes[slot].prev;
        (prev != NIL).then_some(prev)
    }

    /// Hints the CPU to bring `slot`'s node into cache.
    pub(super) fn prefetch(&self, slot: usize) {
        if let Some(node) = self.nodes.get(slot) {
            crate::prefetch::range(std::ptr::from_ref(node).cast(), size_of::<Node<T>>());
        }
    }

    pub(super) fn get_mut(&mut self, slot: usize) -> &mut T {
        self.nodes[slot].value.as_mut().expect("reading an empty LRU slot")
    }

    fn link_front(&mut self, slot: usize) {
        self.nodes[slot].prev = NIL;
        self.nodes[slot].next = self.head;
        if self.head == NIL {
            self.tail = slot;
        } else {
            self.nodes[self.head].prev = slot;
        }
        self.head = slot;
    }

    fn unlink(&mut self, slot: usize) {
        let Node { prev, next, .. } = self.nodes[slot];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::Lru;

    /// Walks the list from most to least recently used.
    fn order(lru: &Lru<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        let mut slot = lru.head;
        while slot != super::NIL {
            out.push(*lru.get(slot));
            slot = lru.nodes[slot].next;
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        Touch(usize),
        Remove(usize),
        PopBack,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Push),
            2 => any::<usize>().prop_map(Op::Touch),
            1 => any::<usize>().prop_map(Op::Remove),
            1 => Just(Op::PopBack),
        ]
    }

    proptest! {
        /// The list agrees with a `VecDeque` model (front = most recent) after any sequence of
        /// operations, and walking it backwards gives the same order.
        #[test]
        fn matches_a_vecdeque_model(ops in prop::collection::vec(op(), 0..200)) {
            let mut lru = Lru::new();
            let mut model: VecDeque<(u32, usize)> = VecDeque::new();
            let mut next = 0u32;
            for op in ops {
                match op {
                    Op::Push => {
                        let slot = lru.push_front(next);
                        model.push_front((next, slot));
                        next += 1;
                    }
                    Op::Touch(i) if !model.is_empty() => {
                        let entry = model.remove(i % model.len()).unwrap();
                        lru.touch(entry.1);
                        model.push_front(entry);
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let (value, slot) = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(lru.remove(slot), value);
                    }
                    Op::PopBack => {
                        prop_assert_eq!(lru.back(), model.back().map(|&(_, slot)| slot));
                        if let Some((value, slot)) = model.pop_back() {
                            prop_assert_eq!(lru.remove(slot), value);
                        }
                    }
                    Op::Touch(_) | Op::Remove(_) => {}
                }
                prop_assert_eq!(lru.len(), model.len());
                prop_assert_eq!(order(&lru), model.iter().map(|&(v, _)| v).collect::<Vec<_>>());
                let mut backwards = Vec::new();
                let mut slot = lru.tail;
                while slot != super::NIL {
                    backwards.push(*lru.get(slot));
                    slot = lru.nodes[slot].prev;
                }
                backwards.reverse();
                prop_assert_eq!(backwards, order(&lru));
            }
        }
    }
}
