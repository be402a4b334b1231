//! Brokers that share one provider receive each other's events: here three "services" in one
//! process on the in-process bus (one shared `MemoryProvider`), exactly as instances sharing a
//! Redis, NATS or PostgreSQL server would.
//!
//! - `api` publishes orders and sees its own events once, locally (no echo);
//! - `audit` is a fan-out instance: it receives every order;
//! - `mailer-1` and `mailer-2` form one work-queue group: each order is mailed by one of them.
//!
//! ```text
//! cargo run --example cross_instance
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::{Broker, Distribution, Event, EventSource, MemoryProvider};

fn counter(broker: &Broker, pattern: &str) -> Result<Arc<AtomicU64>, Box<dyn std::error::Error>> {
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    broker.subscribe_infallible(pattern, move |_: &Event| {
        c.fetch_add(1, Ordering::Relaxed);
    })?;
    Ok(count)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = Arc::new(MemoryProvider::default());
    let service = |id: &str, distribution: Distribution| {
        Broker::builder().provider(bus.clone()).instance_id(id).distribution(distribution).workers(1).build()
    };
    let api = service("api", Distribution::FanOut)?;
    let audit = service("audit", Distribution::FanOut)?;
    let mailers = Distribution::WorkQueue("mailers".into());
    let mailer_1 = service("mailer-1", mailers.clone())?;
    let mailer_2 = service("mailer-2", mailers)?;

    let seen_by_api = counter(&api, "orders.>")?;
    let audited = counter(&audit, "orders.>")?;
    let first_mailer = counter(&mailer_1, "orders.created")?;
    let second_mailer = counter(&mailer_2, "orders.created")?;

    let n: u64 = 1_000;
    for i in 0..1_000 {
        let order = Event::new(EventSource::Internal, "orders.created")
            .with_user_id(i)
            .with_partition_key(format!("customer-{}", i % 10));
        api.publish(order)?;
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let mailed = || first_mailer.load(Ordering::Relaxed) + second_mailer.load(Ordering::Relaxed);
    while (audited.load(Ordering::Relaxed) < n || mailed() < n) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("api saw its own orders:    {}", seen_by_api.load(Ordering::Relaxed));
    println!("audit (fan-out) received:  {}", audited.load(Ordering::Relaxed));
    println!(
        "mailers (work-queue) split: {} + {} = {}",
        first_mailer.load(Ordering::Relaxed),
        second_mailer.load(Ordering::Relaxed),
        mailed()
    );
    assert_eq!(seen_by_api.load(Ordering::Relaxed), n, "once each, never echoed back");
    assert_eq!(audited.load(Ordering::Relaxed), n, "fan-out: every order");
    assert_eq!(mailed(), n, "work-queue: every order, each by one mailer");

    for broker in [&api, &audit, &mailer_1, &mailer_2] {
        let report = broker.shutdown(Duration::from_secs(10));
        assert!(report.is_clean(), "{report:?}");
    }
    Ok(())
}
