//! Heap allocations per event on the default path (before the short strings were inline and the
//! memory provider was written inline: 7 to build, about 2 to publish and handle): an event built
//! as a CRUD hook builds it,
//! published with default settings (status tracking on, the memory provider, inline writes) and
//! delivered to five handlers. Counted by a global allocator over every thread.
//!
//! Run with `cargo test --test alloc_per_event -- --nocapture` to see the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::{Broker, Event, EventSource};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; the counter has no effect on the allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
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

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    f();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn the_default_path_allocates_a_bounded_few_times_per_event() {
    let n: u64 = 20_000;
    let built = allocations_during(|| {
        for i in 0..n {
            std::hint::black_box(crud_event(i));
        }
    });

    let broker = Broker::builder().workers(1).build().unwrap();
    for pattern in ["public.customers.update", "public.*.update", "*.customers.*", "public.>", "*"] {
        broker
            .subscribe_infallible(pattern, |e: &Event| {
                std::hint::black_box(e.entity.len());
            })
            .unwrap();
    }
    let wait_for = |target: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while broker.stats().processed < target {
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
