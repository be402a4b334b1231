//! Helpers shared by the broker's integration tests.

use std::time::{Duration, Instant};

use eventbroker::{Event, EventSource, RetryPolicy};

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

/// Retries 5 ms apart, doubling up to 20 ms, without jitter: a test's retries end in milliseconds.
#[allow(dead_code)] // Not every test binary retries.
pub fn quick_retries(max_retries: u32) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        initial_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        backoff_factor: 2.0,
        jitter: 0.0,
    }
}

/// The value of the series `name` whose labels include every one of `labels`, in Prometheus'
/// text format.
#[allow(dead_code)] // Only the metrics test binaries scrape.
pub fn prometheus_value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
        let matches =
            series_name == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}
