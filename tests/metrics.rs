//! Metrics: scraped over HTTP from the `metrics_server` example's server, with a Prometheus
//! recorder installed for the whole binary. Each test uses a namespace of its own, so the tests
//! run in parallel on the one recorder without reading each other's series.

mod common;

#[allow(dead_code, reason = "the example's `main` is not used here, only its `serve`")]
#[path = "../examples/metrics_server.rs"]
mod metrics_server;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::{event, prometheus_value, wait_until};
use eventbroker::metrics::MetricsConfig;
use eventbroker::{Broker, Event, EventSource, RetryPolicy};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

const WAIT: Duration = Duration::from_secs(10);

/// The Prometheus recorder, installed once, and the example's server over it on an ephemeral
/// loopback port; returns where to scrape.
fn server() -> SocketAddr {
    static SERVER: OnceLock<SocketAddr> = OnceLock::new();
    *SERVER.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle: PrometheusHandle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("a loopback port"));
        let address = server.server_addr().to_ip().expect("an IP listener");
        // The server lives as long as the test binary; its thread ends with the process.
        std::thread::spawn(move || metrics_server::serve(&server, &handle));
        address
    })
}

/// `GET /metrics` over a plain TCP connection, every step bounded.
fn scrape() -> String {
    let mut stream = TcpStream::connect_timeout(&server(), WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Scrapes until `name{labels}` reads `expected`, or fails after `WAIT`.
fn wait_for_value(name: &str, labels: &[(&str, &str)], expected: f64) {
    let mut last = None;
    wait_until(&format!("{name}{labels:?} to read {expected}"), WAIT, || {
        last = prometheus_value(&scrape(), name, labels);
        last == Some(expected)
    });
}

fn broker(namespace: &str, configure: impl FnOnce(MetricsConfig) -> MetricsConfig) -> Broker {
    server();
    let config = configure(MetricsConfig {
        namespace: Some(namespace.to_owned()),
        report_interval: Duration::from_millis(20),
        ..MetricsConfig::default()
    });
    Broker::builder().workers(2).retry_policy(RetryPolicy::none()).metrics(config).build().unwrap()
}

#[test]
fn counters_carry_the_seeds_names_labels_and_values() {
    let broker = broker("seed", |c| c);
    broker.subscribe_infallible("public.users.*", |_| {}).unwrap();
    broker.subscribe("orders.*", |_| Err::<(), _>("declined")).unwrap();
    for _ in 0..25 {
        broker.publish(Event::for_entity(EventSource::Database, "public", "users", "create")).unwrap();
    }
    for _ in 0..3 {
        broker.publish(Event::new(EventSource::Frontend, "orders.paid")).unwrap();
    }
    broker.publish_sync(Event::for_entity(EventSource::Database, "public", "users", "create")).unwrap();
    for _ in 0..2 {
        broker.publish(Event::new(EventSource::Internal, "nobody.listens")).unwrap();
    }
    broker.drain(WAIT).unwrap();

    let users = [("source", "database"), ("type", "public.users.create")];
    let orders = [("source", "frontend"), ("type", "orders.paid")];
    let body = scrape();
    assert_eq!(
        prometheus_value(&body, "seed_eventbroker_events_published_total", &users),
        Some(26.0),
        "{body}"
    );
    assert_eq!(
        prometheus_value(
            &body,
            "seed_eventbroker_events_processed_total",
            &[users[0], users[1], ("status", "completed")]
        ),
        Some(26.0)
    );
    assert_eq!(
        prometheus_value(
            &body,
            "seed_eventbroker_events_processed_total",
            &[orders[0], orders[1], ("status", "failed")]
        ),
        Some(3.0)
    );
    assert_eq!(prometheus_value(&body, "seed_eventbroker_events_published_total", &orders), Some(3.0));
    let timed = prometheus_value(&body, "seed_eventbroker_event_processing_duration_seconds_count", &users)
        .unwrap_or(0.0);
    assert!((1.0..=26.0).contains(&timed), "sampled durations: {timed}\n{body}");
    assert!(body.contains("# TYPE seed_eventbroker_events_published_total counter"), "{body}");

    // Engine-wide counters and gauges come with the next report.
    wait_for_value("seed_eventbroker_dead_letters_total", &[], 3.0);
    wait_for_value("seed_eventbroker_events_unrouted_total", &[], 2.0);
    wait_for_value("seed_eventbroker_workers_active", &[], 2.0);
    wait_for_value("seed_eventbroker_queue_size", &[], 0.0);
    assert!(broker.shutdown(WAIT).is_clean());
    wait_for_value("seed_eventbroker_workers_active", &[], 0.0);
}

#[test]
fn brokers_of_one_process_are_told_apart_by_their_labels() {
    let labelled = |name: &'static str| {
        move |c: MetricsConfig| MetricsConfig { labels: vec![("broker".into(), name.into())], ..c }
    };
    let orders = broker("two", labelled("orders"));
    let audit = broker("two", labelled("audit"));
    for (broker, count) in [(&orders, 3), (&audit, 5)] {
        broker.subscribe("work.*", |_| Err::<(), _>("declined")).unwrap();
        for _ in 0..count {
            broker.publish(event("work.item")).unwrap();
        }
        broker.drain(WAIT).unwrap();
    }
    // Each broker's engine-wide counters and gauges are its own series, not one overwriting
    // the other's.
    wait_for_value("two_eventbroker_dead_letters_total", &[("broker", "orders")], 3.0);
    wait_for_value("two_eventbroker_dead_letters_total", &[("broker", "audit")], 5.0);
    wait_for_value("two_eventbroker_workers_active", &[("broker", "audit")], 2.0);
    let failed = [("broker", "orders"), ("type", "work.item"), ("status", "failed")];
    assert_eq!(prometheus_value(&scrape(), "two_eventbroker_events_processed_total", &failed), Some(3.0));
    assert!(orders.shutdown(WAIT).is_clean());
    wait_for_value("two_eventbroker_workers_active", &[("broker", "orders")], 0.0);
    wait_for_value("two_eventbroker_workers_active", &[("broker", "audit")], 2.0);
    assert!(audit.shutdown(WAIT).is_clean());
}

#[test]
fn gauges_follow_the_queue_both_ways() {
    let broker = broker("gauges", |c| c);
    let (release, gate) = crossbeam_channel::bounded::<()>(0);
    broker
        .subscribe_infallible("slow.>", move |_| {
            let _ = gate.recv_timeout(WAIT);
        })
        .unwrap();
    // One shard holds them all: one partition key.
    for _ in 0..6 {
        broker.publish(Event::new(EventSource::Internal, "slow.work").with_partition_key("k")).unwrap();
    }
    // The worker is in the first event's handler; the other five wait for it.
    wait_for_value("gauges_eventbroker_queue_size", &[], 5.0);
    for _ in 0..6 {
        release.send_timeout((), WAIT).unwrap();
    }
    broker.drain(WAIT).unwrap();
    wait_for_value("gauges_eventbroker_queue_size", &[], 0.0);
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn acknowledged_deliveries_waiting_show_in_their_gauge() {
    let broker = broker("acked", |c| c);
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    for _ in 0..3 {
        broker.publish(event("orders.created")).unwrap();
    }
    let held: Vec<_> = (0..3).map(|_| deliveries.recv_timeout(WAIT).unwrap()).collect();
    wait_for_value("acked_eventbroker_awaiting_acks", &[], 3.0);
    held.into_iter().for_each(eventbroker::Delivery::ack);
    broker.drain(WAIT).unwrap();
    wait_for_value("acked_eventbroker_awaiting_acks", &[], 0.0);
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn types_beyond_the_limit_fold_into_other_and_are_counted() {
    let broker = broker("fold", |c| MetricsConfig { max_types: 3, timing_sample: 1, ..c });
    broker.subscribe_infallible(">", |_| {}).unwrap();
    for kind in ["a", "b", "c", "d", "e"] {
        for _ in 0..4 {
            broker.publish(Event::new(EventSource::System, format!("fold.{kind}"))).unwrap();
        }
    }
    broker.drain(WAIT).unwrap();
    let body = scrape();
    let published =
        |t: &str| prometheus_value(&body, "fold_eventbroker_events_published_total", &[("type", t)]);
    let own: Vec<&str> = ["fold.a", "fold.b", "fold.c", "fold.d", "fold.e"]
        .into_iter()
        .filter(|t| published(t).is_some())
        .collect();
    assert_eq!(own.len(), 3, "{body}");
    assert!(own.iter().all(|t| published(t) == Some(4.0)), "{body}");
    assert_eq!(published("other"), Some(8.0), "{body}");
    let labelled = body.lines().filter(|l| l.starts_with("fold_eventbroker_events_published_total{")).count();
    assert_eq!(labelled, 4, "three types and other\n{body}");
    wait_for_value("fold_eventbroker_events_folded_total", &[], 8.0);
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn a_broker_without_metrics_records_nothing() {
    let broker = broker("off", |c| MetricsConfig { enabled: false, ..c });
    broker.subscribe_infallible(">", |_| {}).unwrap();
    broker.publish(event("off.x")).unwrap();
    broker.drain(WAIT).unwrap();
    assert!(!scrape().contains("off_eventbroker_"));
    assert!(broker.shutdown(WAIT).is_clean());
}

/// Brokers built one after another under one name (a restart after a configuration reload) add
/// to the same series: the engine-wide counters count the second broker's dead letters and
/// failures on top of the first's, as the per-type counters do.
#[test]
fn the_engine_wide_counters_of_a_rebuilt_broker_add_to_its_predecessors() {
    for failing in [3, 2] {
        let broker = broker("rebuilt", |c| c);
        broker.subscribe("pay.*", |_: &Event| Err::<(), _>("declined")).unwrap();
        for _ in 0..failing {
            broker.publish(Event::new(EventSource::Internal, "pay.failed")).unwrap();
        }
        broker.drain(WAIT).unwrap();
        assert_eq!(broker.stats().dead_letters, failing);
        assert!(broker.shutdown(WAIT).is_clean());
    }
    wait_for_value("rebuilt_eventbroker_events_processed_total", &[("status", "failed")], 5.0);
    wait_for_value("rebuilt_eventbroker_dead_letters_total", &[], 5.0);
    wait_for_value("rebuilt_eventbroker_handler_failures_total", &[], 5.0);
}
