//! Heap allocations per event on the default path, and which thread frees them, (before the short strings were inline and the
//! memory provider was written inline: 7 to build, about 2 to publish and handle): an event built
//! as a CRUD hook builds it,
//! published with default settings (status tracking on, the memory provider, inline writes) and
//! delivered to five handlers. Counted by a global allocator over every thread.
//!
//! With status tracking off, the worker holds an event's last reference once its handlers have
//! run; it hands such events back, and the publisher builds its next events in their allocations,
//! so that malloc's memory stays with the thread that allocates it (see `src/dispatch/spent.rs`).
//!
//! Run with `cargo test --test alloc_per_event -- --nocapture` to see the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbroker::{Broker, Event, EventSource};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);

/// The tests count over every thread: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

thread_local! {
    /// Frees on this thread (a const initialiser: counting never allocates).
    static FREES_HERE: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter has no effect on the allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREES.fetch_add(1, Ordering::Relaxed);
        // `try_with`: a thread's last frees may come after its locals are gone.
        let _ = FREES_HERE.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn crud_event(n: u64) -> Event {
    let mut event = Event::for_entity(EventSource::Database, "public", "customers", "update")
        .with_user_id(1042)
        .with_session_id("sess-4f2a9c1e");
    event
        .set_payload_json(format!(r#"{{"id":{n},"name":"customer","email":"c@example.com","plan":"pro"}}"#))
        .unwrap();
    event
}

/// Five handlers that each event of `crud_event` meets; returns the count of events handled.
///
/// The tests wait on this count rather than on `Broker::stats`, which allocates: a wait that
/// polled it would count its own allocations, more of them the slower the host.
fn subscribe_five(broker: &Broker) -> Arc<AtomicU64> {
    for pattern in ["public.customers.update", "public.*.update", "*.customers.*", "public.>"] {
        broker
            .subscribe_infallible(pattern, |e: &Event| {
                std::hint::black_box(e.entity.len());
            })
            .unwrap();
    }
    let handled = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&handled);
    broker
        .subscribe_infallible("*", move |e: &Event| {
            std::hint::black_box(e.entity.len());
            count.fetch_add(1, Ordering::Release);
        })
        .unwrap();
    handled
}

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    f();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn the_default_path_allocates_a_bounded_few_times_per_event() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let n: u64 = 20_000;
    let built = allocations_during(|| {
        for i in 0..n {
            std::hint::black_box(crud_event(i));
        }
    });

    let broker = Broker::builder().workers(1).build().unwrap();
    let handled = subscribe_five(&broker);
    let wait_for = |target: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while handled.load(Ordering::Acquire) < target {
            assert!(Instant::now() < deadline, "events were not processed");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // Warm up: fill the provider to its bound and the caches, so the measure is the steady state.
    for i in 0..12_000 {
        broker.publish(crud_event(i)).unwrap();
    }
    wait_for(12_000);
    let events: Vec<Event> = (0..n).map(crud_event).collect();
    let published = allocations_during(|| {
        for event in events {
            broker.publish(event).unwrap();
        }
        wait_for(12_000 + n);
    });
    assert!(broker.shutdown(Duration::from_secs(10)).is_clean());

    #[allow(clippy::cast_precision_loss, reason = "a ratio for a report")]
    let per = |count: u64| count as f64 / n as f64;
    println!(
        "allocations per event: building {:.2}, publishing and handling {:.2}",
        per(built),
        per(published)
    );
    // Building: the payload's text, and its conversion to a boxed `RawValue` (the short strings are
    // inline). Publishing: the `Arc` the handlers share.
    assert!(per(built) <= 2.5, "building an event allocates {:.2} times", per(built));
    assert!(per(published) <= 1.1, "publishing and handling allocate {:.2} times per event", per(published));
}

#[test]
fn untracked_events_reuse_spent_allocations_on_the_publishing_thread() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let broker = Broker::builder().workers(1).track_status(false).build().unwrap();
    let handled = subscribe_five(&broker);
    // Bursts smaller than the shard's ring, each handled before the next: the publisher never
    // waits for room, and finds the previous burst's events handed back.
    let burst = 256;
    let mut published = 0;
    let mut publish_bursts = |bursts: u64| {
        let (mut allocations, mut all, mut here) = (0, 0, 0);
        for _ in 0..bursts {
            let events: Vec<Event> = (0..burst).map(crud_event).collect();
            let before =
                (ALLOCATIONS.load(Ordering::Relaxed), FREES.load(Ordering::Relaxed), FREES_HERE.get());
            for event in events {
                broker.publish(event).unwrap();
            }
            published += burst;
            let deadline = Instant::now() + Duration::from_secs(60);
            while handled.load(Ordering::Acquire) < published {
                assert!(Instant::now() < deadline, "events were not processed");
                std::thread::yield_now();
            }
            allocations += ALLOCATIONS.load(Ordering::Relaxed) - before.0;
            all += FREES.load(Ordering::Relaxed) - before.1;
            here += FREES_HERE.get() - before.2;
        }
        (allocations, all, here)
    };
    publish_bursts(4);
    let bursts = 40;
    let (allocations, all, here) = publish_bursts(bursts);
    assert!(broker.shutdown(Duration::from_secs(10)).is_clean());
    let n = bursts * burst;
    #[allow(clippy::cast_precision_loss, reason = "ratios for a report")]
    let (per_event, share) = (allocations as f64 / n as f64, here as f64 / all as f64);
    println!(
        "untracked: {per_event:.2} allocations per event published and handled; {all} frees, {:.0} % on the publishing thread",
        share * 100.0
    );
    // The `Arc` is a spent event's, and the event it held (its payload's text) is freed where it
    // was allocated.
    assert!(per_event <= 0.1, "publishing and handling allocate {per_event:.2} times per event");
    // Every event is freed once it is reused, but at either end of the window some are still in
    // the worker's hands or waiting in the shard's list and the publisher's spares: those differ
    // between the ends by far less than a burst (-50 to +170 seen), never by the events' count.
    assert!(all + burst >= n, "{all} frees for {n} events");
    assert!(share >= 0.9, "only {here} of {all} frees were on the publishing thread");
}
