//! Without the `metrics` feature: the same names as `recording`, doing nothing, so the engine's
//! insertion points compile away.
#![allow(clippy::unused_self, reason = "the methods of the feature's types, doing nothing")]

use std::sync::Arc;
use std::time::Instant;

use super::MetricsConfig;
use crate::Event;
use crate::dispatch::delivery::{Counts, Job};

/// A broker's metrics: none.
pub(crate) struct EngineMetrics;

impl EngineMetrics {
    pub(crate) fn new(_: &MetricsConfig, _: &str) -> Option<Arc<Self>> {
        None
    }

    pub(crate) fn sync_begin(&self) -> Option<Instant> {
        None
    }

    pub(crate) fn sync_end(&self, _: &Event, _: &Counts, _: Option<Instant>) {}

    pub(crate) fn stop_reporter(&self, _: Instant) {}
}

/// What `WorkerMetrics::begin` hands to `end`: nothing.
#[derive(Clone, Copy)]
pub(crate) struct Probe;

/// A worker's metrics: none.
pub(crate) struct WorkerMetrics;

impl WorkerMetrics {
    pub(crate) fn new(_: Option<&Arc<EngineMetrics>>) -> Self {
        Self
    }

    #[inline]
    pub(crate) fn begin(&mut self, _: &Job, _: &Counts) -> Probe {
        Probe
    }

    #[inline]
    pub(crate) fn end(&mut self, _: Probe, _: &Counts) {}

    #[inline]
    pub(crate) fn settled_late(&mut self, _: &Event, _: bool) {}

    #[inline]
    pub(crate) fn begin_turn(&mut self) {}

    #[inline]
    pub(crate) fn end_turn(&mut self) {}
}
