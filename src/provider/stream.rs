//! Event streams: bounded tails of newly stored events that never slow the provider down.
//!
//! The receiving side is [`EventStream`]. The sending side, [`StreamHub`], is what a provider
//! embeds: it keeps one sender per open stream, offers each newly stored event to the streams
//! whose pattern matches without ever blocking, and counts what a full stream missed.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use crate::event::Event;
use crate::pattern::Pattern;

/// Why an [`EventStream`] receive returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream's buffer was full and this many events were skipped at this point of the
    /// stream. Receiving again continues with the events after the gap.
    #[error("the stream fell behind and missed {0} events")]
    Lagged(u64),
    /// The provider closed the stream and every buffered event has been received.
    #[error("the stream is closed")]
    Closed,
    /// No event is buffered now ([`EventStream::try_recv`] only).
    #[error("no event is ready")]
    Empty,
    /// No event arrived within the timeout ([`EventStream::recv_timeout`] only).
    #[error("timed out waiting for an event")]
    Timeout,
}

/// One event on its way into a stream, with the number of events the stream missed just before
/// it.
struct Delivery {
    missed_before: u64,
    event: Arc<Event>,
}

/// A bounded receiver of newly stored events whose type matches a pattern, from
/// [`MemoryProvider::stream`](super::MemoryProvider::stream). Usable from blocking code ([`recv`],
/// [`recv_timeout`], [`try_recv`], or as an [`Iterator`]) and from async code ([`recv_async`]).
///
/// ## Lagging
/// A stream buffers a fixed number of events (for the memory provider,
/// [`MemoryConfig::stream_capacity`](super::MemoryConfig::stream_capacity), 1024 by default).
/// The provider never waits for a stream: when the buffer is full, the event is skipped for this
/// stream and counted. The receive that reaches the place of the gap returns
/// [`StreamError::Lagged`]`(n)` with `n` the number skipped there, and the next receive continues
/// with the first event after the gap. Nothing is lost silently: the events received plus the
/// lag counts add up to every matching event stored while the stream was open.
///
/// ## Closing
/// When the provider closes, receives first return what is still buffered (and a final
/// [`StreamError::Lagged`] if events were skipped after it), then [`StreamError::Closed`]. A
/// receiver blocked in [`recv`] wakes up. Dropping the stream unsubscribes it.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::{Event, EventSink, EventSource, MemoryConfig, MemoryProvider, Pattern, Provider, StreamError};
///
/// let provider = MemoryProvider::new(MemoryConfig { stream_capacity: 2, ..MemoryConfig::default() });
/// let mut stream = provider.stream(&Pattern::parse("orders.>")?)?;
///
/// let orders: Vec<_> =
///     (0..3).map(|_| Arc::new(Event::new(EventSource::System, "orders.created"))).collect();
/// provider.store_batch(&orders, None)?; // the third does not fit in the buffer of 2
/// provider.store_batch(&[Arc::new(Event::new(EventSource::System, "users.created"))], None)?; // no match
///
/// assert_eq!(stream.recv()?.id, orders[0].id);
/// assert_eq!(stream.recv()?.id, orders[1].id);
/// assert_eq!(stream.recv(), Err(StreamError::Lagged(1)));
/// assert_eq!(stream.try_recv(), Err(StreamError::Empty));
///
/// provider.close()?;
/// assert_eq!(stream.recv(), Err(StreamError::Closed));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`recv`]: EventStream::recv
/// [`recv_timeout`]: EventStream::recv_timeout
/// [`try_recv`]: EventStream::try_recv
/// [`recv_async`]: EventStream::recv_async
pub struct EventStream {
    rx: flume::Receiver<Delivery>,
    /// Events skipped after the last delivery that got through. Shared with the stream's tap in
    /// the hub; the lock makes "the buffer is empty and this many were missed" one observation.
    missed: Arc<Mutex<u64>>,
    /// An event received together with a lag report, returned by the next receive.
    held: Option<Arc<Event>>,
}

impl EventStream {
    /// Waits for the next event.
    ///
    /// # Errors
    /// [`StreamError::Lagged`] at a gap, [`StreamError::Closed`] once the provider closed and the
    /// buffer is drained.
    pub fn recv(&mut self) -> Result<Arc<Event>, StreamError> {
        if let Some(ready) = self.poll_now() {
            return ready;
        }
        match self.rx.recv() {
            Ok(delivery) => Self::unpack(&mut self.held, delivery),
            Err(flume::RecvError::Disconnected) => self.end(),
        }
    }

    /// Waits up to `timeout` for the next event.
    ///
    /// # Errors
    /// As [`EventStream::recv`], and [`StreamError::Timeout`] when nothing arrived in time.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Arc<Event>, StreamError> {
        if let Some(ready) = self.poll_now() {
            return ready;
        }
        match self.rx.recv_timeout(timeout) {
            Ok(delivery) => Self::unpack(&mut self.held, delivery),
            Err(flume::RecvTimeoutError::Timeout) => Err(StreamError::Timeout),
            Err(flume::RecvTimeoutError::Disconnected) => self.end(),
        }
    }

    /// The next event if one is buffered, without waiting.
    ///
    /// # Errors
    /// As [`EventStream::recv`], and [`StreamError::Empty`] when nothing is buffered.
    pub fn try_recv(&mut self) -> Result<Arc<Event>, StreamError> {
        self.poll_now().unwrap_or(Err(StreamError::Empty))
    }

    /// Waits for the next event without blocking the thread. Cancel-safe: dropping the future
    /// before it completes loses no event.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use eventbroker::{Event, EventSink, EventSource, MemoryProvider, Pattern};
    /// # let provider = MemoryProvider::default();
    /// let mut stream = provider.stream(&Pattern::parse("*")?)?;
    /// provider.store_batch(&[Arc::new(Event::new(EventSource::System, "system.tick"))], None)?;
    /// let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    /// let event = runtime.block_on(stream.recv_async())?;
    /// assert_eq!(event.event_type, "system.tick");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`EventStream::recv`].
    pub async fn recv_async(&mut self) -> Result<Arc<Event>, StreamError> {
        if let Some(ready) = self.poll_now() {
            return ready;
        }
        match self.rx.recv_async().await {
            Ok(delivery) => Self::unpack(&mut self.held, delivery),
            Err(flume::RecvError::Disconnected) => self.end(),
        }
    }

    /// A receive that needs no waiting: a held event, a buffered delivery, a lag at the end of the
    /// buffer, or the end of the stream. `None` when the caller has to wait.
    fn poll_now(&mut self) -> Option<Result<Arc<Event>, StreamError>> {
        if let Some(event) = self.held.take() {
            return Some(Ok(event));
        }
        // Holding `missed` while looking at the buffer keeps the tap from adding to either in
        // between, so a lag reported here really sits after every buffered event.
        let mut missed = self.missed.lock();
        match self.rx.try_recv() {
            Ok(delivery) => {
                drop(missed);
                Some(Self::unpack(&mut self.held, delivery))
            }
            Err(flume::TryRecvError::Empty) => match mem::take(&mut *missed) {
                0 => None,
                n => Some(Err(StreamError::Lagged(n))),
            },
            Err(flume::TryRecvError::Disconnected) => Some(Self::lagged_or(&mut missed, StreamError::Closed)),
        }
    }

    fn unpack(held: &mut Option<Arc<Event>>, delivery: Delivery) -> Result<Arc<Event>, StreamError> {
        if delivery.missed_before == 0 {
            Ok(delivery.event)
        } else {
            *held = Some(delivery.event);
            Err(StreamError::Lagged(delivery.missed_before))
        }
    }

    /// The result once every sender is gone and the buffer is empty.
    fn end(&mut self) -> Result<Arc<Event>, StreamError> {
        Self::lagged_or(&mut self.missed.lock(), StreamError::Closed)
    }

    fn lagged_or(missed: &mut u64, otherwise: StreamError) -> Result<Arc<Event>, StreamError> {
        match mem::take(missed) {
            0 => Err(otherwise),
            n => Err(StreamError::Lagged(n)),
        }
    }
}

/// Yields events until the stream is closed; a gap is yielded as `Err(StreamError::Lagged(n))`.
impl Iterator for EventStream {
    type Item = Result<Arc<Event>, StreamError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.recv() {
            Err(StreamError::Closed) => None,
            other => Some(other),
        }
    }
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream")
            .field("buffered", &(self.rx.len() + usize::from(self.held.is_some())))
            .field("closed", &self.rx.is_disconnected())
            .finish_non_exhaustive()
    }
}

/// The sending side of one stream.
struct Tap {
    pattern: Pattern,
    tx: flume::Sender<Delivery>,
    missed: Arc<Mutex<u64>>,
}

enum Offer {
    Delivered,
    Missed,
    Unmatched,
    Gone,
}

impl Tap {
    /// Offers `event` without blocking: delivered with the pending lag count, or counted as
    /// missed when the buffer is full.
    fn offer(&self, event: &Arc<Event>) -> Offer {
        if !self.pattern.matches(&event.event_type) {
            return Offer::Unmatched;
        }
        let mut missed = self.missed.lock();
        match self.tx.try_send(Delivery { missed_before: *missed, event: Arc::clone(event) }) {
            Ok(()) => {
                *missed = 0;
                Offer::Delivered
            }
            Err(flume::TrySendError::Full(_)) => {
                *missed += 1;
                Offer::Missed
            }
            Err(flume::TrySendError::Disconnected(_)) => Offer::Gone,
        }
    }
}

struct HubState {
    closed: bool,
    taps: Vec<Tap>,
    delivered: u64,
    missed: u64,
}

/// The sending side of a provider's [`EventStream`]s, for provider implementations.
///
/// A provider opens streams with [`StreamHub::open`], and after storing a batch offers the new
/// events through a [`StreamDelivery`]. To keep every stream in store order when stores run on
/// several threads, take the delivery while still holding the provider's own write lock, release
/// that lock, then send: deliveries are serialised in the order the stores were, and the store
/// lock is never held while sending.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::provider::StreamHub;
/// use eventbroker::{Event, EventSource, Pattern};
///
/// let hub = StreamHub::new(16);
/// let mut stream = hub.open(Pattern::parse("audit.>")?);
/// let event = Arc::new(Event::new(EventSource::System, "audit.login"));
/// hub.begin_delivery().send(&event);
/// assert_eq!(stream.try_recv()?.id, event.id);
///
/// hub.close();
/// assert_eq!(stream.try_recv(), Err(eventbroker::StreamError::Closed));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StreamHub {
    capacity: usize,
    state: Mutex<HubState>,
    /// Streams in `state`, kept current under its lock, read without it by [`StreamHub::is_tailed`].
    open: AtomicUsize,
}

impl StreamHub {
    /// A hub whose streams each buffer `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::new(HubState { closed: false, taps: Vec::new(), delivered: 0, missed: 0 }),
            open: AtomicUsize::new(0),
        }
    }

    /// How many events each stream buffers.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Opens a stream of the events sent from now on whose type matches `pattern`. After
    /// [`StreamHub::close`] the stream is already ended.
    pub fn open(&self, pattern: Pattern) -> EventStream {
        let (tx, rx) = flume::bounded(self.capacity);
        let missed = Arc::new(Mutex::new(0));
        let mut state = self.state.lock();
        if !state.closed {
            // Receivers that never matched an event are only noticed here.
            state.taps.retain(|tap| !tap.tx.is_disconnected());
            state.taps.push(Tap { pattern, tx, missed: Arc::clone(&missed) });
            // Relaxed: a hint for stores, which take the lock before relying on it.
            self.open.store(state.taps.len(), Ordering::Relaxed);
        }
        EventStream { rx, missed, held: None }
    }

    /// Locks the hub for sending; sends through the returned delivery reach every stream in the
    /// order they are made.
    pub fn begin_delivery(&self) -> StreamDelivery<'_> {
        StreamDelivery { state: self.state.lock(), open: &self.open }
    }

    /// Whether any stream is open: when not, a provider need not offer events at all. A snapshot:
    /// a stream opening at the same time as a store may miss that event.
    pub fn is_tailed(&self) -> bool {
        // Relaxed: see `open`.
        self.open.load(Ordering::Relaxed) > 0
    }

    /// Ends every stream: receivers get what is buffered, then [`StreamError::Closed`]. Streams
    /// opened afterwards are ended at once. Never waits on a receiver.
    pub fn close(&self) {
        let taps = {
            let mut state = self.state.lock();
            state.closed = true;
            self.open.store(0, Ordering::Relaxed);
            mem::take(&mut state.taps)
        };
        drop(taps); // Dropping the senders is what ends the streams.
    }

    /// Streams whose receiver is still alive.
    pub fn active(&self) -> usize {
        self.state.lock().taps.iter().filter(|tap| !tap.tx.is_disconnected()).count()
    }

    /// Events delivered into streams so far, one per stream that received it.
    pub fn delivered(&self) -> u64 {
        self.state.lock().delivered
    }

    /// Events skipped so far because a stream's buffer was full, one per stream that missed it.
    pub fn missed(&self) -> u64 {
        self.state.lock().missed
    }
}

impl fmt::Debug for StreamHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("StreamHub")
            .field("capacity", &self.capacity)
            .field("streams", &state.taps.len())
            .field("closed", &state.closed)
            .finish_non_exhaustive()
    }
}

/// Exclusive access to a [`StreamHub`] for sending; from [`StreamHub::begin_delivery`].
pub struct StreamDelivery<'a> {
    state: MutexGuard<'a, HubState>,
    open: &'a AtomicUsize,
}

impl Drop for StreamDelivery<'_> {
    fn drop(&mut self) {
        // Relaxed: see `StreamHub::open`; streams whose receiver was dropped are gone now.
        self.open.store(self.state.taps.len(), Ordering::Relaxed);
    }
}

impl StreamDelivery<'_> {
    /// Offers `event` to every open stream whose pattern matches its type. Never blocks: a full
    /// stream counts the event as missed. Streams whose receiver was dropped are removed.
    pub fn send(&mut self, event: &Arc<Event>) {
        let HubState { taps, delivered, missed, .. } = &mut *self.state;
        taps.retain(|tap| match tap.offer(event) {
            Offer::Delivered => {
                *delivered += 1;
                true
            }
            Offer::Missed => {
                *missed += 1;
                true
            }
            Offer::Unmatched => true,
            Offer::Gone => false,
        });
    }

    /// Whether no stream is open, so sending would do nothing.
    pub fn is_idle(&self) -> bool {
        self.state.taps.is_empty()
    }
}
