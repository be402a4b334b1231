//! Serves the broker's metrics at `/metrics` for Prometheus.
//!
//! The recorder is `metrics-exporter-prometheus`'s, installed without its hyper listener; a small
//! synchronous `tiny_http` server renders it on each scrape. A background thread publishes a few
//! events a second so there is something to see.
//!
//! ```text
//! cargo run --example metrics_server --features metrics              # serves 127.0.0.1:9464
//! cargo run --example metrics_server --features metrics -- 0.0.0.0:9000
//! curl -s http://127.0.0.1:9464/metrics | grep eventbroker_
//! ```

use std::time::Duration;

use eventbroker::{Broker, Event, EventSource};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Answers `GET /metrics` with the rendered recorder and anything else with 404, until
/// `server.unblock()` is called.
pub fn serve(server: &tiny_http::Server, handle: &PrometheusHandle) {
    for request in server.incoming_requests() {
        let response = if request.method() == &tiny_http::Method::Get && request.url() == "/metrics" {
            handle.run_upkeep();
            let response = tiny_http::Response::from_string(handle.render());
            // Prometheus picks its parser by this header.
            match tiny_http::Header::from_bytes("Content-Type", "text/plain; version=0.0.4") {
                Ok(content_type) => response.with_header(content_type),
                Err(()) => response,
            }
        } else {
            tiny_http::Response::from_string("not found\n").with_status_code(404)
        };
        if let Err(error) = request.respond(response) {
            eprintln!("a scrape failed: {error}");
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9464".to_owned());
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;

    // Built after the recorder is installed, so it records from the first event.
    let broker = Broker::builder().workers(2).instance_id("metrics-demo").build()?;
    broker.subscribe_infallible("public.users.*", |_| std::thread::sleep(Duration::from_millis(2)))?;
    broker.subscribe("public.orders.*", |event: &Event| {
        if event.user_id % 5 == 0 { Err("payment declined") } else { Ok(()) }
    })?;
    let publisher = broker.clone();
    std::thread::spawn(move || {
        for i in 0_i64.. {
            let (entity, operation) = if i % 3 == 0 { ("orders", "create") } else { ("users", "update") };
            let event = Event::for_entity(EventSource::Database, "public", entity, operation).with_user_id(i);
            if publisher.publish(event).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let server = tiny_http::Server::http(&address)?;
    println!("serving http://{address}/metrics");
    serve(&server, &handle);
    Ok(())
}
