//! Helpers shared by the broker's integration tests.

use std::time::{Duration, Instant};

use eventbroker::{Event, EventSource};

/// An internal event of `event_type`.
pub fn event(event_type: &str) -> Event {
    Event::new(EventSource::Internal, event_type)
}

/// Polls `done` every 2 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
