//! Recording (feature `metrics`): a broker's shared metric state, and each worker's per-turn
//! aggregation by `(source, type)`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Unit};

use super::{MetricsConfig, OTHER_TYPE};
use crate::dispatch::delivery::{Counts, Job, Origin};
use crate::{Event, EventSource};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type TypeSet = HashSet<Box<str>, foldhash::fast::RandomState>;

/// Whether a recorder is installed: anything but the facade's zero-sized no-op recorder.
pub(super) fn recorder_installed() -> bool {
    metrics::with_recorder(|recorder| std::mem::size_of_val(recorder) != 0)
}

impl MetricsConfig {
    /// [`MetricsConfig::labels`], as every metric of the broker carries them.
    pub(super) fn constant_labels(&self) -> Vec<Label> {
        self.labels.iter().map(|(name, value)| Label::new(name.clone(), value.clone())).collect()
    }
}

/// What the `metrics` macros pass the recorder when they register a metric of this module.
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// A kind of recorder handle, registered by its key.
pub(super) trait Register {
    fn register(key: &Key) -> Self;
}

impl Register for Counter {
    fn register(key: &Key) -> Self {
        metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA))
    }
}

impl Register for Gauge {
    fn register(key: &Key) -> Self {
        metrics::with_recorder(|recorder| recorder.register_gauge(key, &METADATA))
    }
}

impl Register for Histogram {
    fn register(key: &Key) -> Self {
        metrics::with_recorder(|recorder| recorder.register_histogram(key, &METADATA))
    }
}

/// One series' handle, registered again at its first use in each report epoch (see
/// [`EngineMetrics::epoch`]). A recorder may forget a series: Prometheus' drops one idle for its
/// `idle_timeout`, and a handle held from before then updates nothing it exports, for good; a
/// handle registered (and updated) within the last report interval is one the recorder still
/// exports, as long as its idle timeout is longer than that interval.
pub(super) struct Series<H> {
    key: Key,
    handle: H,
    epoch: u64,
}

impl<H: Register> Series<H> {
    /// Registers the series now, so that it is exported (at zero) before anything is recorded.
    pub(super) fn new(key: Key, epoch: u64) -> Self {
        let handle = H::register(&key);
        Self { key, handle, epoch }
    }

    /// The handle, to be updated in report epoch `epoch`.
    pub(super) fn at(&mut self, epoch: u64) -> &H {
        if self.epoch != epoch {
            self.handle = H::register(&self.key);
            self.epoch = epoch;
        }
        &self.handle
    }
}

/// A broker's metric state, shared by its workers, its synchronous publishes and its reporter.
pub(crate) struct EngineMetrics {
    pub(super) config: MetricsConfig,
    /// Whether a recorder is installed; refreshed by the reporter. Relaxed: a switch read once
    /// per worker turn; a turn that misses a change records from the next.
    active: AtomicBool,
    /// Event types with label values of their own, at most `config.max_types`.
    admitted: parking_lot::Mutex<TypeSet>,
    /// `admitted` once full: it never changes again, so it is read without the lock.
    frozen: OnceLock<TypeSet>,
    /// Events recorded as `other`, not yet added to their counter (Relaxed: a count).
    folded: AtomicU64,
    /// Report epoch: advanced by the reporter every `report_interval`; a [`Series`] registers
    /// its handle again at its first use in a new one. Relaxed: a handle renewed an epoch late
    /// is still one used (so not idle) within the last interval.
    epoch: AtomicU64,
    /// Handles of synchronous publishes, which have no worker table.
    sync_handles: parking_lot::Mutex<FastMap<(EventSource, Box<str>), Handles>>,
    pub(super) instance_id: String,
    pub(super) reporter: super::reporter::Reporter,
}

impl EngineMetrics {
    /// The metric state of a broker, or `None` when metrics are off.
    pub(crate) fn new(config: &MetricsConfig, instance_id: &str) -> Option<Arc<Self>> {
        if !config.enabled {
            return None;
        }
        Some(Arc::new(Self {
            config: config.clone(),
            active: AtomicBool::new(recorder_installed()),
            admitted: parking_lot::Mutex::new(TypeSet::default()),
            frozen: OnceLock::new(),
            folded: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            sync_handles: parking_lot::Mutex::new(FastMap::default()),
            instance_id: instance_id.to_owned(),
            reporter: super::reporter::Reporter::default(),
        }))
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub(super) fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
    }

    /// The report epoch (see [`Series`]).
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Begins the next report epoch, and returns it.
    pub(super) fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Events folded into `other` since the last call.
    pub(super) fn take_folded(&self) -> u64 {
        self.folded.swap(0, Ordering::Relaxed)
    }

    /// The label value of `event_type`: itself while fewer than `max_types` types have one (or it
    /// already has), else `other`.
    fn admit(&self, event_type: &str) -> Option<Box<str>> {
        if let Some(frozen) = self.frozen.get() {
            return frozen.contains(event_type).then(|| event_type.into());
        }
        let mut admitted = self.admitted.lock();
        if admitted.contains(event_type) {
            return Some(event_type.into());
        }
        if admitted.len() < self.config.max_types {
            admitted.insert(event_type.into());
            if admitted.len() == self.config.max_types {
                let _ = self.frozen.set(admitted.clone());
            }
            return Some(event_type.into());
        }
        None
    }

    /// The series of `(source, label)`, registered in report epoch `epoch`.
    fn handles(&self, source: EventSource, label: &str, epoch: u64) -> Handles {
        let mut labels = self.config.constant_labels();
        labels.push(Label::new("source", source.as_str()));
        labels.push(Label::new("type", label.to_owned()));
        let name = |n: &str| self.config.name(n);
        let processed = |status: &'static str| {
            let mut labels = labels.clone();
            labels.push(Label::new("status", status));
            Series::new(Key::from_parts(name("events_processed_total"), labels), epoch)
        };
        Handles {
            published: Series::new(Key::from_parts(name("events_published_total"), labels.clone()), epoch),
            completed: processed("completed"),
            failed: processed("failed"),
            duration: Series::new(Key::from_parts(name("event_processing_duration_seconds"), labels), epoch),
        }
    }

    /// The clock of a synchronous publish, when metrics are being recorded.
    pub(crate) fn sync_begin(&self) -> Option<Instant> {
        self.is_active().then(Instant::now)
    }

    /// Records a synchronous publish of `event` whose deliveries produced `counts`.
    pub(crate) fn sync_end(&self, event: &Event, counts: &Counts, started: Option<Instant>) {
        let Some(started) = started else { return };
        let elapsed = started.elapsed();
        let label = self.admit(&event.event_type);
        if label.is_none() {
            self.folded.fetch_add(1, Ordering::Relaxed);
        }
        let label = label.unwrap_or_else(|| OTHER_TYPE.into());
        let epoch = self.epoch();
        let mut cache = self.sync_handles.lock();
        let handles = cache
            .entry((event.source, label))
            .or_insert_with_key(|(source, label)| self.handles(*source, label, epoch));
        handles.published.at(epoch).increment(1);
        if counts.completed > 0 {
            handles.completed.at(epoch).increment(counts.completed);
        }
        if counts.failed > 0 {
            handles.failed.at(epoch).increment(counts.failed);
        }
        handles.duration.at(epoch).record(elapsed.as_secs_f64());
    }
}

/// The recorder's series of one `(source, type)`.
struct Handles {
    published: Series<Counter>,
    completed: Series<Counter>,
    failed: Series<Counter>,
    duration: Series<Histogram>,
}

/// What one `(source, type)` gathered this turn, and its handles once resolved.
struct Slot {
    source: EventSource,
    label: Box<str>,
    published: u64,
    completed: u64,
    failed: u64,
    /// Sampled durations, in seconds.
    samples: Vec<f64>,
    handles: Option<Handles>,
    touched: bool,
    /// Whether this is an `other` slot: its events count as folded.
    folds: bool,
}

/// What [`WorkerMetrics::begin`] hands to [`WorkerMetrics::end`] for one job.
#[derive(Clone, Copy)]
pub(crate) struct Probe {
    /// `u32::MAX`: not recording.
    slot: u32,
    completed: u64,
    failed: u64,
    started: Option<Instant>,
}

impl Probe {
    const OFF: Self = Self { slot: u32::MAX, completed: 0, failed: 0, started: None };
}

/// A worker's metrics: counts per `(source, type)`, gathered over a turn and handed to the
/// recorder at its end. Owned by the worker thread alone.
pub(crate) struct WorkerMetrics {
    shared: Option<Arc<EngineMetrics>>,
    /// The shared switch, read once per turn.
    active: bool,
    /// Slot of each type seen, per source (indexed by `source as usize`), so a lookup borrows the
    /// event's type instead of building a key. Folded types point to their source's `other` slot.
    index: [FastMap<Box<str>, u32>; EventSource::ALL.len()],
    /// Entries of `index` that point to an `other` slot; past `16 × max_types` they are dropped,
    /// to stay bounded under any stream of types (a dropped type is simply looked up again).
    folded_entries: usize,
    /// The `other` slot per source.
    other: [Option<u32>; EventSource::ALL.len()],
    slots: Vec<Slot>,
    touched: Vec<u32>,
    /// The previous lookup, tried first: events of one type often come in runs.
    last: Option<(EventSource, u32)>,
    folded_now: u64,
    /// Events left until the next timed one.
    countdown: u32,
}

impl WorkerMetrics {
    pub(crate) fn new(shared: Option<&Arc<EngineMetrics>>) -> Self {
        Self {
            active: shared.is_some_and(|s| s.is_active()),
            shared: shared.cloned(),
            index: Default::default(),
            folded_entries: 0,
            other: [None; EventSource::ALL.len()],
            slots: Vec::new(),
            touched: Vec::new(),
            last: None,
            folded_now: 0,
            countdown: 1,
        }
    }

    /// A job is about to be handled: counts it as published (when it is this broker's) and may
    /// start its clock. `counts` are the worker's counts before it.
    #[inline]
    pub(crate) fn begin(&mut self, job: &Job, counts: &Counts) -> Probe {
        if !self.active {
            return Probe::OFF;
        }
        self.begin_active(job, counts)
    }

    fn begin_active(&mut self, job: &Job, counts: &Counts) -> Probe {
        let slot = self.slot_for(job.event.source, &job.event.event_type);
        if self.slots[slot as usize].folds {
            self.folded_now += 1;
        }
        if matches!(job.origin, Origin::Local { .. } | Origin::Replayed) {
            self.slot_mut(slot).published += 1;
        }
        self.countdown -= 1;
        let started = if self.countdown == 0 {
            self.countdown = self.shared.as_ref().map_or(1, |s| s.config.timing_sample);
            Some(Instant::now())
        } else {
            None
        };
        Probe { slot, completed: counts.completed, failed: counts.failed, started }
    }

    /// The job of `probe` was handled: what `counts` gained since `begin` is its outcome (nothing
    /// when it waits for retries; [`settled_late`](Self::settled_late) counts it then).
    #[inline]
    pub(crate) fn end(&mut self, probe: Probe, counts: &Counts) {
        if probe.slot == u32::MAX {
            return;
        }
        let slot = self.slot_mut(probe.slot);
        slot.completed += counts.completed - probe.completed;
        slot.failed += counts.failed - probe.failed;
        if let Some(started) = probe.started {
            slot.samples.push(started.elapsed().as_secs_f64());
        }
    }

    /// A job that waited for retries ended.
    pub(crate) fn settled_late(&mut self, event: &Event, failed: bool) {
        if !self.active {
            return;
        }
        let slot = self.slot_for(event.source, &event.event_type);
        let slot = self.slot_mut(slot);
        if failed {
            slot.failed += 1;
        } else {
            slot.completed += 1;
        }
    }

    fn slot_mut(&mut self, slot: u32) -> &mut Slot {
        let index = slot as usize;
        if !self.slots[index].touched {
            self.slots[index].touched = true;
            self.touched.push(slot);
        }
        &mut self.slots[index]
    }

    /// The slot of `(source, event_type)`: one hash lookup, or none when the previous event had
    /// the same type.
    fn slot_for(&mut self, source: EventSource, event_type: &str) -> u32 {
        match self.last {
            Some((last_source, slot))
                if last_source == source && &*self.slots[slot as usize].label == event_type =>
            {
                slot
            }
            _ => {
                let slot = match self.index[source as usize].get(event_type) {
                    Some(&slot) => slot,
                    None => self.slot_on_miss(source, event_type),
                };
                self.last = Some((source, slot));
                slot
            }
        }
    }

    /// A type this worker has not seen (or forgot): its own slot when the broker admits it, else
    /// its source's `other` slot.
    fn slot_on_miss(&mut self, source: EventSource, event_type: &str) -> u32 {
        if let Some(label) = self.shared.as_ref().and_then(|shared| shared.admit(event_type)) {
            let slot = self.push_slot(source, label.clone(), false);
            self.index[source as usize].insert(label, slot);
            return slot;
        }
        let other = if let Some(slot) = self.other[source as usize] {
            slot
        } else {
            let slot = self.push_slot(source, OTHER_TYPE.into(), true);
            self.other[source as usize] = Some(slot);
            slot
        };
        let max_types = self.shared.as_ref().map_or(0, |s| s.config.max_types);
        if self.folded_entries >= 16 * max_types {
            let slots = &self.slots;
            for index in &mut self.index {
                index.retain(|_, slot| !slots[*slot as usize].folds);
            }
            self.folded_entries = 0;
        }
        self.index[source as usize].insert(event_type.into(), other);
        self.folded_entries += 1;
        other
    }

    fn push_slot(&mut self, source: EventSource, label: Box<str>, folds: bool) -> u32 {
        let slot = u32::try_from(self.slots.len()).unwrap_or(u32::MAX - 1);
        self.slots.push(Slot {
            source,
            label,
            published: 0,
            completed: 0,
            failed: 0,
            samples: Vec::new(),
            handles: None,
            touched: false,
            folds,
        });
        slot
    }

    /// Picks up the shared switch: a worker that slept through the reporter's finding a recorder
    /// counts its first turn after, not only the turns after that one.
    #[inline]
    pub(crate) fn begin_turn(&mut self) {
        if let Some(shared) = &self.shared {
            self.active = shared.is_active();
        }
    }

    /// Hands the turn's counts to the recorder, and picks up the shared switch for the next turn
    /// (the turns of a shutdown's last loop begin without [`WorkerMetrics::begin_turn`]).
    pub(crate) fn end_turn(&mut self) {
        let Some(shared) = &self.shared else { return };
        self.active = shared.is_active();
        if self.folded_now > 0 {
            shared.folded.fetch_add(std::mem::take(&mut self.folded_now), Ordering::Relaxed);
        }
        if self.touched.is_empty() {
            return;
        }
        let epoch = shared.epoch();
        for slot in self.touched.drain(..) {
            let slot = &mut self.slots[slot as usize];
            slot.touched = false;
            let handles = slot.handles.get_or_insert_with(|| shared.handles(slot.source, &slot.label, epoch));
            if slot.published > 0 {
                handles.published.at(epoch).increment(std::mem::take(&mut slot.published));
            }
            if slot.completed > 0 {
                handles.completed.at(epoch).increment(std::mem::take(&mut slot.completed));
            }
            if slot.failed > 0 {
                handles.failed.at(epoch).increment(std::mem::take(&mut slot.failed));
            }
            if !slot.samples.is_empty() {
                let duration = handles.duration.at(epoch);
                for sample in slot.samples.drain(..) {
                    duration.record(sample);
                }
            }
        }
    }
}

/// Describes every metric to the recorder (units and help texts).
pub(super) fn describe(config: &MetricsConfig) {
    let name = |n: &str| config.name(n);
    metrics::describe_counter!(
        name("events_published_total"),
        Unit::Count,
        "Events published, by source and type."
    );
    metrics::describe_counter!(
        name("events_processed_total"),
        Unit::Count,
        "Events whose handling ended, by source, type and status (completed or failed)."
    );
    metrics::describe_histogram!(
        name("event_processing_duration_seconds"),
        Unit::Seconds,
        "Time spent in the handlers of one event (first attempt), sampled."
    );
    metrics::describe_counter!(
        name("events_folded_total"),
        Unit::Count,
        "Events recorded with type=\"other\"."
    );
    metrics::describe_gauge!(
        name("queue_size"),
        Unit::Count,
        "Events accepted and not yet begun by a worker."
    );
    metrics::describe_gauge!(name("workers_active"), Unit::Count, "Worker threads running.");
    metrics::describe_gauge!(name("pending_retries"), Unit::Count, "Deliveries waiting for a retry.");
    metrics::describe_gauge!(
        name("awaiting_acks"),
        Unit::Count,
        "Acknowledged deliveries waiting for their consumer to settle them."
    );
    metrics::describe_gauge!(
        name("writer_backlog"),
        Unit::Count,
        "Stores, status changes, dead letters and acknowledgements not yet written to the provider."
    );
    metrics::describe_gauge!(
        name("inbound_lag_seconds"),
        Unit::Seconds,
        "Age at fetch of the oldest event of the last batch from other instances."
    );
    metrics::describe_counter!(
        name("events_rejected_total"),
        Unit::Count,
        "Publishes refused because the broker was full."
    );
    metrics::describe_counter!(name("retries_total"), Unit::Count, "Retries scheduled.");
    metrics::describe_counter!(
        name("handler_failures_total"),
        Unit::Count,
        "Failed delivery attempts: handler calls, full streams, acknowledged deliveries."
    );
    metrics::describe_counter!(name("dead_letters_total"), Unit::Count, "Deliveries dead-lettered.");
    metrics::describe_counter!(
        name("events_unrouted_total"),
        Unit::Count,
        "Events that matched no subscription (counted as completed too)."
    );
    metrics::describe_counter!(
        name("internal_errors_total"),
        Unit::Count,
        "Panics caught on workers outside handlers."
    );
    metrics::describe_counter!(name("writer_batches_total"), Unit::Count, "Batches written to the provider.");
    metrics::describe_counter!(name("writer_errors_total"), Unit::Count, "Provider calls that failed.");
    metrics::describe_counter!(
        name("writer_dropped_total"),
        Unit::Count,
        "Writes given up after permanent errors."
    );
    metrics::describe_counter!(
        name("inbound_events_total"),
        Unit::Count,
        "Events fetched from other instances."
    );
    metrics::describe_counter!(
        name("inbound_fetch_errors_total"),
        Unit::Count,
        "Failed fetches from other instances."
    );
}

/// Seconds as a gauge value.
pub(super) fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::delivery::Job;

    fn worker(max_types: usize) -> WorkerMetrics {
        let config = MetricsConfig { enabled: true, max_types, ..MetricsConfig::default() };
        let shared = EngineMetrics::new(&config, "test").expect("enabled");
        WorkerMetrics::new(Some(&shared))
    }

    #[test]
    fn types_past_the_limit_share_one_other_slot_per_source() {
        let mut metrics = worker(2);
        let first = metrics.slot_for(EventSource::System, "a.x");
        let second = metrics.slot_for(EventSource::System, "b.x");
        let third = metrics.slot_for(EventSource::System, "c.x");
        let fourth = metrics.slot_for(EventSource::System, "d.x");
        assert_ne!(first, second);
        assert_eq!(third, fourth, "both folded");
        assert_eq!(&*metrics.slots[third as usize].label, OTHER_TYPE);
        assert_eq!(metrics.slot_for(EventSource::System, "a.x"), first, "an admitted type keeps its slot");
        let database = metrics.slot_for(EventSource::Database, "a.x");
        assert_eq!(&*metrics.slots[database as usize].label, "a.x");
        let other_database = metrics.slot_for(EventSource::Database, "c.x");
        assert_ne!(other_database, third, "one other slot per source");
    }

    #[test]
    fn the_folded_index_stays_bounded() {
        let mut metrics = worker(1);
        for i in 0..100 {
            metrics.slot_for(EventSource::System, &format!("t.{i}"));
        }
        let entries: usize = metrics.index.iter().map(HashMap::len).sum();
        assert!(entries <= 1 + 16, "{entries} entries");
        assert_eq!(metrics.slots.len(), 2, "one admitted type and one other slot");
    }

    #[test]
    fn without_a_recorder_a_worker_looks_nothing_up() {
        let mut metrics = worker(8);
        metrics.active = false;
        let job = Job::local(Arc::new(Event::new(EventSource::System, "a.b")));
        let probe = metrics.begin(&job, &Counts::default());
        metrics.end(probe, &Counts::default());
        metrics.end_turn();
        assert!(metrics.slots.is_empty() && metrics.touched.is_empty());
    }
}
