//! Deadline arithmetic that cannot overflow: no setting or input (`Duration::MAX` included) may
//! make a thread panic computing when to stop waiting.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::{Duration, Instant};

/// About a century: what "no deadline" saturates to. Far enough to never be reached, near enough
/// that every platform's `Instant` can represent it.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `start + wait`, or a point about a century away when that overflows.
pub(crate) fn after(start: Instant, wait: Duration) -> Instant {
    start.checked_add(wait.min(FAR)).or_else(|| start.checked_add(Duration::from_secs(3600))).unwrap_or(start)
}

/// `after(Instant::now(), wait)`.
pub(crate) fn from_now(wait: Duration) -> Instant {
    after(Instant::now(), wait)
}

/// `future`'s output, or `None` when `timeout` passes first: a bounded wait for async code, timed
/// by `futures-timer`'s thread rather than any particular runtime.
pub(crate) async fn within<F: Future>(timeout: Duration, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut timer = futures_timer::Delay::new(timeout);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if Pin::new(&mut timer).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_waits_saturate_instead_of_panicking() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(after(now, Duration::from_millis(5)), now + Duration::from_millis(5));
        assert!(from_now(Duration::MAX) > now);
    }
}
