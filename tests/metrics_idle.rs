//! Metrics with a recorder that drops idle series (`PrometheusBuilder::idle_timeout`, the usual
//! way to bound an exporter's memory): its own test binary, since a process has one recorder.
//! A series dropped while idle must come back when it moves again, engine-wide counters and
//! per-type ones alike.

mod common;

use std::time::Duration;

use common::{event, prometheus_value, wait_until};
use eventbroker::metrics::MetricsConfig;
use eventbroker::{Broker, RetryPolicy};
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;

const WAIT: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_millis(300);

#[test]
fn series_the_recorder_dropped_while_idle_come_back_when_they_move() {
    let recorder = PrometheusBuilder::new().idle_timeout(MetricKindMask::ALL, Some(IDLE)).build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
    let config = MetricsConfig {
        namespace: Some("idle".into()),
        report_interval: Duration::from_millis(20),
        ..MetricsConfig::default()
    };
    let broker =
        Broker::builder().workers(1).retry_policy(RetryPolicy::none()).metrics(config).build().unwrap();
    broker.subscribe("pay.>", |_| Err::<(), _>("declined")).unwrap();

    let dead_letters = |body: &str| prometheus_value(body, "idle_eventbroker_dead_letters_total", &[]);
    let failed = |body: &str, t: &str| {
        prometheus_value(
            body,
            "idle_eventbroker_events_processed_total",
            &[("type", t), ("status", "failed")],
        )
    };
    let all_there = |body: &str| {
        dead_letters(body).is_some()
            && failed(body, "pay.async").is_some()
            && failed(body, "pay.sync").is_some()
    };
    let mut body = String::new();
    for round in 1..=2 {
        broker.publish(event("pay.async")).unwrap();
        assert!(broker.publish_sync(event("pay.sync")).is_err());
        broker.drain(WAIT).unwrap();
        wait_until(&format!("round {round}'s failures to show"), WAIT, || {
            body = handle.render();
            all_there(&body)
        });
        // Nothing moves: each scrape past the idle timeout drops the counters.
        std::thread::sleep(IDLE * 2);
        wait_until(&format!("round {round}'s idle counters to be dropped"), WAIT, || {
            body = handle.render();
            dead_letters(&body).is_none() && failed(&body, "pay.async").is_none()
        });
        assert!(
            prometheus_value(&body, "idle_eventbroker_workers_active", &[]).is_some(),
            "a gauge set every report never idles\n{body}"
        );
    }
    assert!(broker.shutdown(WAIT).is_clean());
}
