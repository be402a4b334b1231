//! A Tokio service that handles events with async code and says when each is done.
//!
//! `subscribe_acked` hands out deliveries that end only when the consumer settles them, so the
//! event stays `processing` (and an event from another instance unacknowledged) while an async
//! task works on it: a failure is retried by the broker, and nothing is lost if the process stops
//! half-way. Publishing uses `publish_when_room`, which waits for room without blocking the
//! runtime; the calls that wait on their thread (`drain`, `shutdown`) run under `spawn_blocking`.
//!
//! ```sh
//! cargo run --example async_consumer
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use eventbroker::{Broker, Delivery, Event, EventSource, RetryPolicy};

/// Handles one order: async work, then `ack`, or `fail` to have the broker retry it. Every fifth
/// order fails its first attempt, as a flaky downstream service would.
async fn handle(delivery: Delivery, flaky: Arc<AtomicU32>) {
    let order: u32 = match delivery.event().payload() {
        Ok(order) => order,
        Err(error) => return delivery.fail(error), // Retried, then dead-lettered.
    };
    tokio::time::sleep(Duration::from_millis(2)).await; // The downstream call.
    if order % 5 == 0 && delivery.attempt() == 1 {
        flaky.fetch_add(1, Ordering::Relaxed);
        delivery.fail(format!("order {order}: the payment service timed out"));
    } else {
        delivery.ack();
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::builder()
        .retry_policy(RetryPolicy { initial_delay: Duration::from_millis(10), ..RetryPolicy::default() })
        .build()?;
    let (_id, deliveries) = broker.subscribe_acked("orders.>")?;

    // The consumer: one task per delivery, as many at once as arrive.
    let flaky = Arc::new(AtomicU32::new(0));
    let consumer = {
        let flaky = Arc::clone(&flaky);
        tokio::spawn(async move {
            while let Ok(delivery) = deliveries.recv_async().await {
                tokio::spawn(handle(delivery, Arc::clone(&flaky)));
            }
        })
    };

    for order in 0..200u32 {
        let event = Event::new(EventSource::Internal, "orders.created").with_payload(&order)?;
        broker.publish_when_room(event).await?;
    }

    let waiting = broker.clone();
    tokio::task::spawn_blocking(move || waiting.drain(Duration::from_secs(10))).await??;
    let stats = broker.stats();
    println!(
        "{} orders completed, {} failed; {} attempts failed and were retried",
        stats.completed,
        stats.failed,
        flaky.load(Ordering::Relaxed)
    );
    assert_eq!((stats.completed, stats.failed), (200, 0));

    let report = tokio::task::spawn_blocking(move || broker.shutdown(Duration::from_secs(5))).await?;
    assert!(report.is_clean(), "{report:?}");
    consumer.await?; // Shutdown ended the subscription, and with it the channel.
    Ok(())
}
