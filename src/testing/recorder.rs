//! A subscriber that records what it receives, and waits with a bound for what a test expects.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::{Broker, Event, SubscribeError, SubscriptionId};

/// Records the events one subscription receives, in the order its handler ran, and waits, with a
/// bound, until a test's expected number has arrived. Clones share the record.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::testing::Recorder;
/// use eventbroker::{Broker, Event, EventSource};
///
/// let broker = Broker::builder().build()?;
/// let orders = Recorder::subscribe(&broker, "orders.>")?;
/// broker.publish(Event::new(EventSource::Internal, "orders.created"))?;
/// broker.publish(Event::new(EventSource::Internal, "users.created"))?;
///
/// let seen = orders.wait_for(1, Duration::from_secs(5))?;
/// assert_eq!(seen[0].event_type, "orders.created");
///
/// // Nothing else arrives: drain, then look.
/// broker.drain(Duration::from_secs(5))?;
/// assert_eq!(orders.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Recorder {
    id: SubscriptionId,
    record: Arc<Record>,
}

#[derive(Default)]
struct Record {
    events: Mutex<Vec<Arc<Event>>>,
    arrived: Condvar,
}

impl Recorder {
    /// Subscribes a handler to `pattern` on `broker` that records every event it receives.
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe(broker: &Broker, pattern: &str) -> Result<Self, SubscribeError> {
        let record = Arc::new(Record::default());
        let recording = Arc::clone(&record);
        let id = broker.subscribe_infallible(pattern, move |event| {
            recording.events.lock().push(Arc::new(event.clone()));
            recording.arrived.notify_all();
        })?;
        Ok(Self { id, record })
    }

    /// The subscription's id, to [`Broker::unsubscribe`] it.
    pub fn id(&self) -> SubscriptionId {
        self.id
    }

    /// How many events it has recorded.
    pub fn len(&self) -> usize {
        self.record.events.lock().len()
    }

    /// Whether it has recorded none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The events recorded so far, in the order the handler received them.
    pub fn events(&self) -> Vec<Arc<Event>> {
        self.record.events.lock().clone()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.record.events.lock().clear();
    }

    /// Waits until at least `count` events are recorded, up to `timeout`; returns them all.
    ///
    /// # Errors
    /// [`WaitTimedOut`], saying how many arrived, when fewer than `count` did in time.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Result<Vec<Arc<Event>>, WaitTimedOut> {
        let deadline = crate::deadline::from_now(timeout);
        let mut events = self.record.events.lock();
        while events.len() < count {
            if self.record.arrived.wait_until(&mut events, deadline).timed_out() && events.len() < count {
                return Err(WaitTimedOut { expected: count, received: events.len(), timeout });
            }
        }
        Ok(events.clone())
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("id", &self.id)
            .field("recorded", &self.len())
            .finish_non_exhaustive()
    }
}

/// [`Recorder::wait_for`] ran out of time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("received {received} of {expected} events within {timeout:?}")]
pub struct WaitTimedOut {
    /// The events waited for.
    pub expected: usize,
    /// The events recorded by the timeout.
    pub received: usize,
    /// The timeout given.
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Recorder, WaitTimedOut};
    use crate::{Broker, Event, EventSource};

    #[test]
    fn waits_for_events_published_later_and_says_how_many_came_when_time_runs_out() {
        let broker = Broker::builder().workers(1).build().unwrap();
        let recorder = Recorder::subscribe(&broker, "orders.*").unwrap();
        let publisher = broker.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            for _ in 0..3 {
                publisher.publish(Event::new(EventSource::Internal, "orders.created")).unwrap();
            }
        });
        assert_eq!(recorder.wait_for(3, Duration::from_secs(10)).unwrap().len(), 3);
        late.join().unwrap();

        let started = Instant::now();
        let error = recorder.wait_for(4, Duration::from_millis(50)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(error, WaitTimedOut { expected: 4, received: 3, timeout: Duration::from_millis(50) });
        assert_eq!(error.to_string(), "received 3 of 4 events within 50ms");

        recorder.clear();
        assert!(recorder.is_empty());
        assert!(broker.unsubscribe(recorder.id()));
        broker.publish(Event::new(EventSource::Internal, "orders.created")).unwrap();
        broker.drain(Duration::from_secs(10)).unwrap();
        assert!(recorder.is_empty(), "recorded after its unsubscribe");
    }
}
