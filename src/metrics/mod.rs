//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`), with the
//! seed's names and labels. The application installs the recorder (Prometheus, `StatsD`, …); the
//! broker records into whatever is installed.
//!
//! ## What is recorded
//! Names start with `eventbroker_`, or `<namespace>_eventbroker_` with
//! [`MetricsConfig::namespace`].
//!
//! Every metric also carries the labels of [`MetricsConfig::labels`], when set.
//!
//! | name | kind | labels | |
//! |---|---|---|---|
//! | `eventbroker_events_published_total` | counter | `source`, `type` | events published here, counted when a worker takes them (synchronous publishes at once) |
//! | `eventbroker_events_processed_total` | counter | `source`, `type`, `status` | events whose handling ended: `status` is `completed` or `failed`; local and inbound alike |
//! | `eventbroker_event_processing_duration_seconds` | histogram | `source`, `type` | the handler calls of one event, first attempt (of a `publish_sync`, its whole delivery, retries and their backoff included); sampled, see below |
//! | `eventbroker_events_folded_total` | counter | | events recorded under `type="other"`: their type came after [`MetricsConfig::max_types`] others |
//! | `eventbroker_queue_size` | gauge | | events accepted and not yet begun: in the shard rings, or taken by a worker that has not reached them |
//! | `eventbroker_workers_active` | gauge | | worker threads running (0 once shut down) |
//! | `eventbroker_pending_retries` | gauge | | deliveries waiting for a retry |
//! | `eventbroker_awaiting_acks` | gauge | | acknowledged deliveries waiting for their consumer to settle them ([`Broker::subscribe_acked`](crate::Broker::subscribe_acked)) |
//! | `eventbroker_writer_backlog` | gauge | | writes handed to the writer thread, not yet written to the provider: stored events, status changes, dead letters, acknowledgements |
//! | `eventbroker_inbound_lag_seconds` | gauge | | how long before its fetch the oldest event of the last batch from other instances was created (0 when caught up); while fetches fail, plus the time since the last that succeeded |
//! | `eventbroker_events_rejected_total` | counter | | publishes refused with `Full` |
//! | `eventbroker_retries_total` | counter | | retries scheduled |
//! | `eventbroker_handler_failures_total` | counter | | failed delivery attempts, retries included: handler calls that failed or panicked, deliveries a stream's full channel refused, acknowledged deliveries failed, dropped unsettled or not settled in time ([`BrokerStats::handler_failures`](crate::BrokerStats::handler_failures)) |
//! | `eventbroker_dead_letters_total` | counter | | deliveries dead-lettered |
//! | `eventbroker_events_unrouted_total` | counter | | events that matched no subscription (they count as `completed` in `events_processed_total` too): a pattern that matches nothing shows here |
//! | `eventbroker_internal_errors_total` | counter | | panics caught on workers outside any handler |
//! | `eventbroker_writer_batches_total` | counter | | provider writes (batches) by the writer thread; the memory provider's inline writes are not counted |
//! | `eventbroker_writer_errors_total` | counter | | provider calls that failed |
//! | `eventbroker_writer_dropped_total` | counter | | writes given up after permanent provider errors |
//! | `eventbroker_inbound_events_total` | counter | | events fetched from other instances |
//! | `eventbroker_inbound_fetch_errors_total` | counter | | failed fetches |
//!
//! ## Cost
//! - **Without the feature** nothing is compiled in.
//! - **With it, and no recorder installed**, workers do no metric work per event beyond one
//!   predictable branch: the broker looks for a recorder when it starts and every
//!   [`report_interval`](MetricsConfig::report_interval). (It takes the facade's
//!   zero-sized no-op recorder for "none"; a recorder of your own must not be a zero-sized type.)
//! - **With a recorder**, nothing is sent per event. Each worker counts into a table of its own,
//!   keyed by `(source, type)` and found without allocating (the previous event's entry is tried
//!   first), and hands the totals to the recorder once per turn (a turn drains up to 256 events).
//!   Label strings are built once per `(source, type)`, when first seen.
//! - **Durations** are sampled: each worker times one event in
//!   [`timing_sample`](MetricsConfig::timing_sample) (16 by default; 1 times all), two clock
//!   reads each, so the histogram's count is about a sixteenth of the events processed: use
//!   `eventbroker_events_processed_total` for counts, the histogram for their distribution.
//!
//! The `metrics` bench (`cargo bench --features metrics --bench metrics`) measures the three
//! against each other in one run.
//!
//! ## Labels are bounded
//! The first [`max_types`](MetricsConfig::max_types) event types seen (256 by default, across the
//! broker's workers) get label values of their own; later types are recorded as `other`, and
//! counted in `eventbroker_events_folded_total`. `source` has five values and `status` two.
//!
//! ## Gauges are current
//! Gauges and the engine-wide counters are set from the broker's own counters by a small thread
//! per broker (`eb-metrics-<instance id>`) every [`report_interval`](MetricsConfig::report_interval)
//! (1 s by default), and once more when the broker shuts down, so a scrape is at most one
//! interval behind and never stuck at a value from the last enqueue (the seed's queue gauge
//! was set before each enqueue and never after).
//!
//! ## Recorders that drop idle series
//! A recorder may forget a series nothing updated for a while (Prometheus' exporter does, with
//! `PrometheusBuilder::idle_timeout`), and a handle to it held from before then updates nothing
//! it exports. The broker registers each series again at its first update in every
//! `report_interval` (a lookup in the recorder, no allocation), so one that was dropped comes
//! back, from zero, when it next moves: a dead letter an hour after the last one is counted.
//! Keep the idle timeout longer than `report_interval`.
//!
//! ## Brokers in one process
//! The metrics of brokers with the same names and labels are the same series: their counters add up
//! (the process' total), and their gauges overwrite each other, each reading whichever broker
//! reported last (one shut down sets `workers_active` to 0 under a running one). Give each broker a
//! label of its own ([`MetricsConfig::labels`], added to every metric) or a namespace of its own:
//!
//! ```
//! use eventbroker::metrics::MetricsConfig;
//!
//! let orders = MetricsConfig { labels: vec![("broker".into(), "orders".into())], ..MetricsConfig::default() };
//! let audit = MetricsConfig { labels: vec![("broker".into(), "audit".into())], ..MetricsConfig::default() };
//! # assert!(orders.validate().is_ok() && audit.validate().is_ok());
//! ```

use std::time::Duration;

use crate::error::ConfigError;

#[cfg(not(feature = "metrics"))]
mod disabled;
#[cfg(feature = "metrics")]
mod recording;
#[cfg(feature = "metrics")]
mod reporter;

#[cfg(not(feature = "metrics"))]
pub(crate) use self::disabled::{EngineMetrics, Probe, WorkerMetrics};
#[cfg(feature = "metrics")]
pub(crate) use self::recording::{EngineMetrics, Probe, WorkerMetrics};

/// The label value of event types beyond [`MetricsConfig::max_types`].
pub const OTHER_TYPE: &str = "other";

/// The labels the broker sets on the metrics that have them, and those exporters add to
/// histograms and summaries (Prometheus' `le` and `quantile`).
const RESERVED_LABELS: [&str; 5] = ["source", "type", "status", "le", "quantile"];

/// Letters, digits and `_`, not first a digit: a metric name (prefix) or a label name.
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// How a broker records metrics.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::metrics::MetricsConfig;
///
/// let config = MetricsConfig {
///     namespace: Some("orders".into()),
///     max_types: 1000,
///     ..MetricsConfig::default()
/// };
/// assert_eq!(config.report_interval, Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Whether to record at all. Default: `true` when the `metrics` feature is compiled.
    pub enabled: bool,
    /// Prefix of every name (`<namespace>_eventbroker_…`): letters, digits and `_`, not first a
    /// digit. Default none.
    pub namespace: Option<String>,
    /// Event types with label values of their own; later ones are `other`. Default 256.
    pub max_types: usize,
    /// Each worker times one event in this many for the duration histogram; 1 times every event.
    /// Default 16.
    pub timing_sample: u32,
    /// How often gauges and engine-wide counters are set, and a recorder looked for. Default 1 s;
    /// at least 10 ms.
    pub report_interval: Duration,
    /// Labels added to every metric, as `(name, value)`: what tells the brokers of one process
    /// apart (`broker="orders"`), whose gauges would otherwise overwrite each other (and counters
    /// add up). Names are letters, digits and `_`, not first a digit nor `__`, and not
    /// `source`, `type` or `status`, which the broker sets, nor `le` or `quantile`, which
    /// exporters set; values are not empty. Default none.
    pub labels: Vec<(String, String)>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: cfg!(feature = "metrics"),
            namespace: None,
            max_types: 256,
            timing_sample: 16,
            report_interval: Duration::from_secs(1),
            labels: Vec::new(),
        }
    }
}

impl MetricsConfig {
    /// Checks the settings.
    ///
    /// ```
    /// use eventbroker::metrics::MetricsConfig;
    ///
    /// let bad = MetricsConfig { namespace: Some("9lives".into()), ..MetricsConfig::default() };
    /// assert_eq!(bad.validate().unwrap_err().key(), "metrics.namespace");
    /// ```
    ///
    /// # Errors
    /// [`ConfigError`] naming the field: a namespace that is not a metric name, `max_types` or
    /// `timing_sample` of 0, a `report_interval` under 10 ms, a label name that is not one (or
    /// is the broker's own, or given twice).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(namespace) = &self.namespace {
            if !is_metric_name(namespace) {
                return Err(ConfigError::new(
                    "metrics.namespace",
                    format!(
                        "{namespace:?} is not a metric name prefix (letters, digits and _, not first a digit)"
                    ),
                ));
            }
        }
        if self.max_types == 0 {
            return Err(ConfigError::new("metrics.max_types", "must be at least 1"));
        }
        if self.timing_sample == 0 {
            return Err(ConfigError::new("metrics.timing_sample", "must be at least 1"));
        }
        if self.report_interval < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "metrics.report_interval",
                format!("must be at least 10ms, got {:?}", self.report_interval),
            ));
        }
        for (at, (label, value)) in self.labels.iter().enumerate() {
            let reason = if !is_metric_name(label) || label.starts_with("__") {
                "is not a label name (letters, digits and _, not first a digit nor __)"
            } else if RESERVED_LABELS.contains(&label.as_str()) {
                "is a label the broker or the exporter sets itself"
            } else if self.labels[..at].iter().any(|(earlier, _)| earlier == label) {
                "is given twice"
            } else if value.is_empty() {
                // Prometheus reads an empty value as no label: the series would be shared again.
                "has an empty value"
            } else {
                continue;
            };
            return Err(ConfigError::new("metrics.labels", format!("{label:?} {reason}")));
        }
        Ok(())
    }

    /// The full name of metric `name` (`events_published_total` →
    /// `eventbroker_events_published_total`, or `<namespace>_eventbroker_…`).
    ///
    /// ```
    /// use eventbroker::metrics::MetricsConfig;
    ///
    /// let config = MetricsConfig { namespace: Some("orders".into()), ..MetricsConfig::default() };
    /// assert_eq!(config.name("queue_size"), "orders_eventbroker_queue_size");
    /// ```
    pub fn name(&self, name: &str) -> String {
        match &self.namespace {
            Some(namespace) => format!("{namespace}_eventbroker_{name}"),
            None => format!("eventbroker_{name}"),
        }
    }
}
