//! Metrics with the recorder installed after the broker was built: its own test binary, since a
//! process has one recorder, installed once.

mod common;

use std::time::Duration;

use common::{event, prometheus_value, wait_until};
use eventbroker::Broker;
use eventbroker::metrics::MetricsConfig;
use metrics_exporter_prometheus::PrometheusBuilder;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn a_broker_built_before_the_recorder_counts_every_event_after_it_finds_one() {
    let config = MetricsConfig {
        namespace: Some("late".into()),
        report_interval: Duration::from_millis(20),
        ..MetricsConfig::default()
    };
    let broker = Broker::builder().workers(1).metrics(config).build().unwrap();
    broker.subscribe_infallible("late.>", |_| {}).unwrap();
    // A broker whose reporter looks only once an hour: it finds the recorder at shutdown, and
    // still makes its final report there.
    let hourly = MetricsConfig {
        namespace: Some("hourly".into()),
        report_interval: Duration::from_secs(3600),
        ..MetricsConfig::default()
    };
    let quiet = Broker::builder().workers(1).metrics(hourly).build().unwrap();
    quiet.subscribe_infallible("hourly.>", |_| {}).unwrap();
    for _ in 0..3 {
        quiet.publish(event("hourly.tick")).unwrap();
    }
    quiet.drain(WAIT).unwrap();
    for _ in 0..5 {
        broker.publish(event("late.before")).unwrap();
    }
    broker.drain(WAIT).unwrap();

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
    // The reporter finds the recorder within an interval, while the worker sleeps: nothing wakes
    // it until the next events come.
    wait_until("the reporter to find the recorder", WAIT, || {
        prometheus_value(&handle.render(), "late_eventbroker_workers_active", &[]).is_some()
    });
    for _ in 0..10 {
        broker.publish(event("late.after")).unwrap();
    }
    broker.drain(WAIT).unwrap();
    let published = |body: &str| {
        prometheus_value(body, "late_eventbroker_events_published_total", &[("type", "late.after")])
    };
    let mut body = String::new();
    wait_until("the worker's counts to reach the recorder", WAIT, || {
        body = handle.render();
        published(&body) == Some(10.0)
    });
    assert_eq!(published(&body), Some(10.0), "{body}");
    assert_eq!(
        prometheus_value(&body, "late_eventbroker_events_published_total", &[("type", "late.before")]),
        None
    );
    assert!(broker.shutdown(WAIT).is_clean());

    assert!(quiet.shutdown(WAIT).is_clean());
    let body = handle.render();
    assert_eq!(prometheus_value(&body, "hourly_eventbroker_workers_active", &[]), Some(0.0), "{body}");
    assert_eq!(prometheus_value(&body, "hourly_eventbroker_queue_size", &[]), Some(0.0), "{body}");
}
