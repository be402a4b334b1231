//! Deadline arithmetic that cannot overflow: no setting or input (`Duration::MAX` included) may
//! make a thread panic computing when to stop waiting.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::{Duration, Instant};

/// About a century: what "no deadline" saturates to. Far enough to never be reached, near enough
/// that every platform's `Instant` can represent it.
pub(crate) const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `start + wait`, or a point about a century away when that overflows.
pub(crate) fn after(start: Instant, wait: Duration) -> Instant {
    start.checked_add(wait.min(FAR)).or_else(|| start.checked_add(Duration::from_secs(3600))).unwrap_or(start)
}

/// `after(Instant::now(), wait)`.
pub(crate) fn from_now(wait: Duration) -> Instant {
    after(Instant::now(), wait)
}

/// `future`'s output, or `None` when `timeout` passes first: a bounded wait for async code, timed
/// by `futures-timer`'s thread rather than any particular runtime. The timer is armed only when
/// `future` is not ready at its first poll: one ready at once (a write the memory provider made
/// on the caller's thread) costs no timer and wakes no other thread. Its deadline is then counted
/// from that first poll, a moment after the call.
pub(crate) async fn within<F: Future>(timeout: Duration, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut timer: Option<futures_timer::Delay> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        let timer = timer.get_or_insert_with(|| {
            #[cfg(test)]
            tests::ARMED.with(|armed| armed.set(armed.get() + 1));
            futures_timer::Delay::new(timeout)
        });
        if Pin::new(timer).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// Timers [`within`] armed on this thread.
        pub(super) static ARMED: Cell<u32> = const { Cell::new(0) };
    }

    /// A future ready at once is not timed; one that is not waits its timeout, no longer.
    #[test]
    fn within_arms_a_timer_only_for_a_future_that_waits() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let armed = || ARMED.with(Cell::get);
        assert_eq!(runtime.block_on(within(Duration::from_secs(5), std::future::ready(7))), Some(7));
        assert_eq!(armed(), 0, "a ready future needs no timer");

        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(runtime.block_on(within(Duration::from_millis(20), never)), None);
        assert_eq!(armed(), 1);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(20) && waited < Duration::from_secs(5), "{waited:?}");
    }

    #[test]
    fn huge_waits_saturate_instead_of_panicking() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(after(now, Duration::from_millis(5)), now + Duration::from_millis(5));
        assert!(from_now(Duration::MAX) > now);
    }
}
