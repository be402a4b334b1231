//! The match path allocates nothing: a cold `PatternSet::matches` with up to 8 results, and a
//! warm `MatchCache` on hits, on first misses (answered from its scratch buffer) and on misses
//! that refill a slot whose buffers are big enough.
//!
//! A counting global allocator, per thread, so the test harness' own threads do not interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use eventbroker::{MatchCache, Pattern, PatternSet};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers every call to `System`, only counting allocations on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller upholds `realloc`'s contract, which is `System.realloc`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn set() -> PatternSet<u64> {
    let mut set = PatternSet::new();
    for (i, p) in
        ["*", ">", "public.>", "public.*.create", "public.users.create", "*.*.create", "public.users.*"]
            .iter()
            .enumerate()
    {
        set.insert(&Pattern::parse(p).unwrap(), i as u64);
    }
    for i in 0..1000 {
        set.insert(&Pattern::parse(&format!("s{i:02}.e{}.op", i % 7)).unwrap(), 100 + i);
    }
    set
}

#[test]
fn a_cold_match_of_up_to_eight_results_does_not_allocate() {
    let set = set();
    let deep = vec!["public"; eventbroker::MAX_SEGMENTS].join(".");
    let mut total = 0;
    let n = allocations_in(|| {
        for t in ["public.users.create", "s05.e5.op", "nothing.here", "public", deep.as_str()] {
            let hits = set.matches(t);
            assert!(hits.len() <= 8);
            total += hits.len();
        }
    });
    assert_eq!(total, 7 + 3 + 2 + 2 + 3);
    assert_eq!(n, 0);
}

#[test]
fn a_warm_cache_does_not_allocate() {
    let set = set();
    // Same-length types with as many matches each, so every slot's buffers fit every type.
    let types: Vec<String> = (0..64).map(|i| format!("s{i:02}.e{}.op", i % 7)).collect();
    let mut cache = MatchCache::new(16);
    let lookup_each_thrice = |cache: &mut MatchCache<u64>| {
        for t in &types {
            for _ in 0..3 {
                // Noted by the doorkeeper, then cached, then a hit.
                assert_eq!(cache.get_or_match(&set, t).len(), 3);
            }
        }
    };
    for _ in 0..2 {
        lookup_each_thrice(&mut cache);
    }
    // Overflowing a 16-slot cache with 64 types: every type is noted, refills a slot, then hits.
    let n = allocations_in(|| lookup_each_thrice(&mut cache));
    let stats = cache.stats();
    assert!(stats.hits >= 192 && stats.evictions > 0, "{stats:?}");
    assert_eq!(n, 0);
}
