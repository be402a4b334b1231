//! loom model of the subscription snapshot swap: readers load the current set without a lock
//! while a writer subscribes and unsubscribes.
#![cfg(eventbroker_loom)]

use eventbroker::__private::Subscriptions;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

mod common;
use common::model;

/// Every snapshot a reader loads is whole (its matches agree with its size), a reader that knows
/// `subscribe` returned sees the subscription until the unsubscribe begins, and one that knows
/// `unsubscribe` returned never sees it again.
#[test]
fn readers_see_whole_snapshots_and_unsubscribe_is_final() {
    model(3, || {
        let table = Arc::new(Subscriptions::new());
        let subscribed = Arc::new(AtomicBool::new(false));
        let unsubscribing = Arc::new(AtomicBool::new(false));
        let unsubscribed = Arc::new(AtomicBool::new(false));
        let writer = {
            let (table, subscribed, unsubscribing, unsubscribed) = (
                Arc::clone(&table),
                Arc::clone(&subscribed),
                Arc::clone(&unsubscribing),
                Arc::clone(&unsubscribed),
            );
            thread::spawn(move || {
                let first = table.subscribe("orders.*");
                let second = table.subscribe("orders.>");
                subscribed.store(true, Ordering::Release);
                unsubscribing.store(true, Ordering::Release);
                assert!(table.unsubscribe(first));
                unsubscribed.store(true, Ordering::Release);
                second
            })
        };
        for _ in 0..2 {
            let was_unsubscribed = unsubscribed.load(Ordering::Acquire);
            let was_subscribed = subscribed.load(Ordering::Acquire);
            let (ids, size) = table.matches("orders.paid");
            let unsubscribe_began = unsubscribing.load(Ordering::Acquire);
            assert_eq!(ids.len(), size, "a snapshot's matches and size agree");
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "handlers in subscription order");
            if was_unsubscribed {
                assert_eq!(ids.len(), 1, "an unsubscribed handler is never matched again");
            } else if was_subscribed && !unsubscribe_began {
                assert_eq!(ids.len(), 2, "a returned subscribe is seen");
            }
        }
        let second = writer.join().unwrap();
        assert_eq!(table.matches("orders.paid").0, [second]);
    });
}
