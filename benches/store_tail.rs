//! What one publish waits for in the memory provider: the time of each store, one event at a
//! time, as the broker's publishers make it (handing back the event's ticket), with the status
//! updates a worker writes between them, each with its event's ticket — each batch of 256 events'
//! `processing` updates with the completions of the batch before. Percentiles over 2 000 000
//! stores at the default bound (10 000 events), after 100 000 to fill it, from one thread: no
//! other thread's work is timed.
//!
//! Run: `cargo bench --bench store_tail` (`cargo test --benches` runs 200 000 stores).

use std::sync::Arc;
use std::time::Instant;

use eventbroker::__private::memory::{self, Ticket};
use eventbroker::{Event, EventSource, EventStatus, MemoryProvider, StatusUpdate};
use hdrhistogram::Histogram;

/// Events per worker batch: the broker's default.
const BATCH: usize = 256;
const WARM_UP: usize = 100_000;

/// An event stored, with its store's ticket.
type Stored = (Arc<Event>, Ticket);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let bench = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let stores = if bench { 2_000_000 } else { 200_000 };
    let provider = MemoryProvider::default();
    let mut took = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram bounds");
    let (mut taken, mut finished): (Vec<Stored>, Vec<Stored>) = (Vec::new(), Vec::new());
    for i in 0..stores + WARM_UP {
        let event = Arc::new(Event::for_entity(EventSource::Database, "public", "users", "update"));
        let start = Instant::now();
        let ticket = memory::store(&provider, &event).expect("store");
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if i >= WARM_UP {
            took.saturating_record(nanos.max(1));
        }
        taken.push((event, ticket));
        if taken.len() == BATCH {
            let completed =
                finished.iter().map(|(e, t)| (StatusUpdate::new(e.id, EventStatus::Completed), *t));
            let processing =
                taken.iter().map(|(e, t)| (StatusUpdate::new(e.id, EventStatus::Processing), *t));
            for (update, ticket) in completed.chain(processing) {
                memory::update(&provider, &update, ticket).expect("statuses");
            }
            finished = std::mem::take(&mut taken);
        }
    }
    println!("a store of one event, ns, over {stores} stores with a worker's status writes between them");
    println!("| mean | p50 | p90 | p99 | p99.5 | p99.9 | p99.99 | max |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let at = |q: f64| took.value_at_quantile(q);
    println!(
        "| {:.0} | {} | {} | {} | {} | {} | {} | {} |",
        took.mean(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.995),
        at(0.999),
        at(0.9999),
        took.max()
    );
}
