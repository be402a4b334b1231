//! Retries: the policy that spaces them, and the delay queue that holds them off the shard.
//!
//! A retry belongs to one delivery (one event to one subscription): its count starts at 0 for each
//! delivery, and a failing handler never delays the other handlers of the event nor the events
//! behind it. In async mode a retry waits in its worker's [`DelayQueue`] while the worker goes on
//! draining its ring; the worker wakes when the earliest retry is due.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::error::ConfigError;

/// How failed deliveries are retried: exponential backoff with jitter, then a dead letter.
///
/// Retry `n` (1-based) waits `min(initial_delay × backoff_factor^(n−1), max_delay)`, shortened
/// by a random fraction of at most `jitter` so that failures that happened together do not retry
/// together. With the defaults (3 retries, 1 s, ×2, 30 s cap, jitter 0.2) a delivery is tried at
/// about 0 s, 0.8–1 s, 2.4–3 s and 5.6–7 s, then dead-lettered.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::RetryPolicy;
///
/// let policy = RetryPolicy {
///     max_retries: 5,
///     initial_delay: Duration::from_millis(10),
///     max_delay: Duration::from_millis(50),
///     backoff_factor: 3.0,
///     jitter: 0.0,
/// };
/// let delays: Vec<_> = (1..=5).map(|n| policy.delay_for_retry(n, 0.5)).collect();
/// assert_eq!(delays, [10, 30, 50, 50, 50].map(Duration::from_millis));
///
/// assert_eq!(RetryPolicy::none().max_retries, 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 turns retries off.
    pub max_retries: u32,
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
    /// Growth of the delay per retry; at least 1.
    pub backoff_factor: f64,
    /// Largest fraction, in `[0, 1]`, by which a delay is randomly shortened.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// The seed's policy (3 retries, 1 s, ×2, at most 30 s) with 20% jitter.
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            backoff_factor: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// No retries: a failed delivery is dead-lettered at once.
    pub const fn none() -> Self {
        Self {
            max_retries: 0,
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            backoff_factor: 1.0,
            jitter: 0.0,
        }
    }

    /// The delay before retry `retry` (1-based), given `unit`, a random number in `[0, 1)` that
    /// picks the jitter. The result lies in `[base × (1 − jitter), base]` where `base` is the
    /// capped exponential delay.
    pub fn delay_for_retry(&self, retry: u32, unit: f64) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = self.initial_delay.as_secs_f64() * self.backoff_factor.powi(exponent);
        let base = if grown.is_finite() {
            grown.min(self.max_delay.as_secs_f64())
        } else {
            self.max_delay.as_secs_f64()
        };
        let shortened = base * (1.0 - self.jitter * unit.clamp(0.0, 1.0));
        // Saturates: a delay near `Duration::MAX` rounds up past it as an `f64`.
        Duration::try_from_secs_f64(shortened.max(0.0)).unwrap_or(Duration::MAX)
    }

    /// Checks the fields make sense together.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field: a `backoff_factor` below 1 or not finite, a `jitter`
    /// outside `[0, 1]`, or an `initial_delay` above `max_delay`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.backoff_factor.is_finite() && self.backoff_factor >= 1.0) {
            return Err(ConfigError::new(
                "retry_policy.backoff_factor",
                format!("must be a finite number of at least 1, got {}", self.backoff_factor),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::new(
                "retry_policy.jitter",
                format!("must lie in [0, 1], got {}", self.jitter),
            ));
        }
        if self.initial_delay > self.max_delay {
            return Err(ConfigError::new(
                "retry_policy.initial_delay",
                format!("{:?} is above max_delay {:?}", self.initial_delay, self.max_delay),
            ));
        }
        Ok(())
    }
}

/// Items waiting until an instant, taken out in due order (ties in insertion order).
pub(crate) struct DelayQueue<T> {
    heap: BinaryHeap<Delayed<T>>,
    next_seq: u64,
}

struct Delayed<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Delayed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<T> Eq for Delayed<T> {}

impl<T> PartialOrd for Delayed<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Delayed<T> {
    /// Reversed, so the max-heap yields the earliest due first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl<T> DelayQueue<T> {
    pub(crate) fn new() -> Self {
        Self { heap: BinaryHeap::new(), next_seq: 0 }
    }

    pub(crate) fn push(&mut self, due: Instant, item: T) {
        self.heap.push(Delayed { due, seq: self.next_seq, item });
        self.next_seq += 1;
    }

    /// The earliest item due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.heap.peek()?.due <= now { self.heap.pop().map(|d| d.item) } else { None }
    }

    /// When the earliest item comes due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|d| d.due)
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Removes every item, earliest first.
    pub(crate) fn drain_in_order(&mut self) -> Vec<T> {
        let mut all = std::mem::take(&mut self.heap).into_sorted_vec();
        all.reverse(); // `into_sorted_vec` is ascending by `Ord`, which is reversed.
        all.into_iter().map(|d| d.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
        let secs: Vec<f64> = (1..=7).map(|n| p.delay_for_retry(n, 0.9).as_secs_f64()).collect();
        assert_eq!(secs, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]);
        assert_eq!(p.delay_for_retry(u32::MAX, 0.0), Duration::from_secs(30), "no overflow");
    }

    #[test]
    fn the_longest_delays_saturate_instead_of_panicking() {
        let p = RetryPolicy {
            max_retries: u32::MAX,
            initial_delay: Duration::MAX,
            max_delay: Duration::MAX,
            backoff_factor: 2.0,
            jitter: 0.0,
        };
        assert!(p.validate().is_ok());
        assert_eq!(p.delay_for_retry(1, 0.0), Duration::MAX);
        assert_eq!(p.delay_for_retry(u32::MAX, 0.5), Duration::MAX);
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let p = RetryPolicy { jitter: 0.25, ..RetryPolicy::default() };
        for i in 0..=100 {
            let unit = f64::from(i) / 100.0;
            let d = p.delay_for_retry(3, unit).as_secs_f64();
            assert!((3.0..=4.0).contains(&d), "{d}");
        }
        assert_eq!(p.delay_for_retry(3, 0.0), Duration::from_secs(4));
        assert_eq!(p.delay_for_retry(3, 1.0), Duration::from_secs(3));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = RetryPolicy { backoff_factor: 0.5, ..RetryPolicy::default() };
        assert_eq!(bad.validate().unwrap_err().key(), "retry_policy.backoff_factor");
        let bad = RetryPolicy { jitter: 1.5, ..RetryPolicy::default() };
        assert_eq!(bad.validate().unwrap_err().key(), "retry_policy.jitter");
        let bad = RetryPolicy { initial_delay: Duration::from_secs(60), ..RetryPolicy::default() };
        assert_eq!(bad.validate().unwrap_err().key(), "retry_policy.initial_delay");
        assert!(RetryPolicy::none().validate().is_ok());
        assert!(RetryPolicy::default().validate().is_ok());
    }

    #[test]
    fn delay_queue_yields_in_due_order_then_insertion_order() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new();
        q.push(t0 + Duration::from_millis(20), "c");
        q.push(t0 + Duration::from_millis(10), "a");
        q.push(t0 + Duration::from_millis(10), "b");
        assert_eq!(q.next_due(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(q.pop_due(t0), None);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(15)), Some("a"));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(15)), Some("b"));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(15)), None);
        q.push(t0, "z");
        assert_eq!(q.drain_in_order(), ["z", "c"]);
        assert_eq!(q.len(), 0);
    }
}
