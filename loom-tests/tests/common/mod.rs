//! Shared by every model.

/// Runs `f` under loom with a preemption bound of `LOOM_MAX_PREEMPTIONS`, or `default_bound`.
pub fn model(default_bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(default_bound);
    builder.check(f);
}
