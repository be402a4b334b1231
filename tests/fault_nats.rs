//! Fault tests of the NATS provider: the server restarted during a publish loop, connections cut,
//! a server that stops answering. They stop and restart this machine's NATS (127.0.0.1:4222, the
//! one `scripts/ensure-service nats` starts) or cut connections to it through a proxy of their
//! own, so they run one at a time, in their own test binary, and always leave NATS running.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::provider::nats::NatsBackend;
use eventbroker::testing::conformance::Scope;
use eventbroker::{
    Ack, ConsumerGroup, Event, EventId, EventSink, EventStore, Inbound, InboundConfig, Provider,
    ProviderError, ReplayFrom,
};
use parking_lot::Mutex;

/// One fault test at a time: each one owns the server while it runs.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long a test waits for the provider to recover from a fault.
const RECOVER: Duration = Duration::from_secs(30);

fn ensure_service() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-service");
    let status = std::process::Command::new(script).arg("nats").status().expect("run ensure-service");
    assert!(status.success(), "NATS could not be started: {status}");
}

fn stop_server() {
    let status = std::process::Command::new("start-stop-daemon")
        .args(["--stop", "--oknodo", "--retry", "TERM/10/KILL/5", "--exec", "/usr/sbin/nats-server"])
        .status()
        .expect("run start-stop-daemon");
    assert!(status.success(), "NATS did not stop: {status}");
}

/// Makes sure NATS runs again when the test ends, whatever happened in it.
struct LeaveRunning;

impl Drop for LeaveRunning {
    fn drop(&mut self) {
        ensure_service();
    }
}

/// Stores `batch` the way a broker's writer does: the same batch again after a transient failure,
/// with a short pause, until it is stored or [`RECOVER`] passes. Returns how many attempts failed.
fn store_until_stored(provider: &dyn Provider, batch: &[Arc<Event>]) -> usize {
    let deadline = Instant::now() + RECOVER;
    let mut failures = 0;
    loop {
        match provider.store_batch(batch, None) {
            Ok(()) => return failures,
            Err(error) if error.is_transient() && Instant::now() < deadline => {
                failures += 1;
                thread::sleep(Duration::from_millis(50));
            }
            Err(error) => panic!("store_batch did not recover: {error}"),
        }
    }
}

/// Replays every event of `scope` and asserts each id of `accepted` is stored exactly once, and
/// nothing else is.
fn assert_stored_once(provider: &dyn Provider, scope: &Scope, accepted: &[EventId]) {
    let replayed = provider
        .replay(ReplayFrom::Beginning, Some(&scope.all()), accepted.len() * 2 + 10)
        .expect("replay")
        .events;
    let mut counts: HashMap<EventId, usize> = HashMap::new();
    for stored in &replayed {
        *counts.entry(stored.event.id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert_eq!(counts.len(), accepted.len(), "every accepted event is stored");
    assert!(accepted.iter().all(|id| counts.contains_key(id)));
    let stats = provider.stats().expect("stats");
    assert_eq!(
        stats.provider_specific["stream_messages"].as_u64(),
        Some(accepted.len() as u64),
        "one message each"
    );
    assert_eq!(stats.total_events, accepted.len() as u64, "one record each");
}

/// NATS stopped and started again while batches are being stored: every batch is eventually
/// accepted, and every accepted event is stored exactly once (the retries are de-duplicated by
/// event id). A consumer that fetched throughout receives every event.
#[test]
fn a_server_restarted_during_a_publish_loop_stores_every_accepted_event_once() {
    let _serial = SERIAL.lock();
    ensure_service();
    let _leave_running = LeaveRunning;
    let backend = NatsBackend::with(|config| {
        config.request_timeout = Duration::from_secs(1);
        config.reconnect_max_delay = Duration::from_millis(200);
    });
    let provider = backend.provider();
    let scope = Scope::new();
    let consumer = backend.provider();
    let source = consumer
        .open_inbound(
            &InboundConfig::new(scope.name("c"), scope.instance("c")).with_claim_idle(Duration::from_secs(2)),
        )
        .expect("open_inbound");
    source.set_filter(&[scope.all()]).expect("set_filter");

    let server_back = Arc::new(AtomicBool::new(false));
    let restarter = thread::spawn({
        let server_back = Arc::clone(&server_back);
        move || {
            thread::sleep(Duration::from_millis(300));
            stop_server();
            // Longer than the request timeout: stores fail and are retried, not just delayed.
            thread::sleep(Duration::from_millis(2500));
            ensure_service();
            server_back.store(true, Ordering::Relaxed);
        }
    });
    // Store until the server is back, and 20 batches more.
    let deadline = Instant::now() + RECOVER;
    let mut accepted = Vec::new();
    let (mut failures, mut after) = (0, 0);
    for round in 0.. {
        assert!(Instant::now() < deadline, "the loop did not end");
        if server_back.load(Ordering::Relaxed) {
            after += 1;
            if after > 20 {
                break;
            }
        }
        let batch: Vec<Arc<Event>> =
            (0..25).map(|i| Arc::new(scope.event(&format!("r{}.e{i}", round % 4)))).collect();
        failures += store_until_stored(&provider, &batch);
        accepted.extend(batch.iter().map(|e| e.id));
        thread::sleep(Duration::from_millis(15));
    }
    restarter.join().expect("the restarter does not panic");
    let disconnects = provider.stats().expect("stats").provider_specific["disconnects"].as_u64();
    assert!(disconnects >= Some(1), "the provider saw the restart");
    assert!(failures > 0, "stores failed during the outage and were retried");

    assert_stored_once(&provider, &scope, &accepted);
    let received = receive_all(&*source, accepted.len());
    assert!(accepted.iter().all(|id| received.contains_key(id)), "the consumer received every event");
}

/// Fetches and acknowledges until `n` distinct events came, riding out transient errors.
fn receive_all(source: &dyn Inbound, n: usize) -> HashMap<EventId, u32> {
    let deadline = Instant::now() + RECOVER;
    let mut received = HashMap::new();
    while received.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} events arrived", received.len());
        match source.fetch(500, Duration::from_millis(200)) {
            Ok(batch) => {
                let acks: Vec<Ack> = batch.iter().map(|e| Ack::handled(e.token)).collect();
                if let Err(error) = source.ack(&acks) {
                    assert!(error.is_transient(), "{error}");
                }
                for event in batch {
                    *received.entry(event.event.id).or_insert(0) += 1;
                }
            }
            Err(error) => {
                assert!(error.is_transient(), "{error}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    received
}

/// A TCP proxy to the NATS server that can cut every connection through it, or stop forwarding
/// without closing anything (a server that hangs).
struct Proxy {
    url: String,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let url = format!("nats://{}", listener.local_addr().expect("address"));
        let upstream = NatsBackend::url().trim_start_matches("nats://").to_owned();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (conns, freeze, halt) = (Arc::clone(&connections), Arc::clone(&frozen), Arc::clone(&stop));
        thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(&upstream) else { continue };
                        client.set_nonblocking(false).expect("blocking");
                        for (from, to) in [(&client, &server), (&server, &client)] {
                            let (from, to) =
                                (from.try_clone().expect("clone"), to.try_clone().expect("clone"));
                            let (freeze, halt) = (Arc::clone(&freeze), Arc::clone(&halt));
                            thread::spawn(move || pump(from, to, &freeze, &halt));
                        }
                        conns.lock().extend([client, server]);
                    }
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
        });
        Self { url, connections, frozen, stop }
    }

    /// Closes every connection through the proxy; clients reconnect through it.
    fn cut(&self) {
        for stream in self.connections.lock().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.freeze(false);
        self.cut();
    }
}

/// Copies bytes from `from` to `to` until either closes or the proxy stops; while frozen, reads
/// nothing.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
    let mut buffer = vec![0; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if frozen.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A fresh layout reached through `proxy` (1 s request timeout), a provider on it, and a fan-out
/// source filtered to a fresh scope.
fn through(proxy: &Proxy) -> (NatsBackend, eventbroker::NatsProvider, Scope, Arc<dyn Inbound>) {
    ensure_service();
    let backend = NatsBackend::with(|config| {
        config.url.clone_from(&proxy.url);
        config.request_timeout = Duration::from_secs(1);
        config.reconnect_max_delay = Duration::from_millis(100);
    });
    let provider = backend.provider();
    let scope = Scope::new();
    let source = provider
        .open_inbound(&InboundConfig::new(scope.name("c"), ConsumerGroup::Instance(scope.name("c"))))
        .expect("open_inbound");
    source.set_filter(&[scope.all()]).expect("set_filter");
    (backend, provider, scope, source)
}

/// Connections cut under a provider and its source: calls fail as transient errors for a moment,
/// the client reconnects, and nothing stored is lost or doubled.
#[test]
fn connections_cut_under_a_provider_are_reestablished() {
    let _serial = SERIAL.lock();
    let proxy = Proxy::start();
    let (_backend, provider, scope, source) = through(&proxy);

    let mut accepted = Vec::new();
    let mut failures = 0;
    for round in 0..30 {
        if round % 10 == 5 {
            proxy.cut();
        }
        let batch: Vec<Arc<Event>> = (0..20).map(|_| Arc::new(scope.event("cut.tick"))).collect();
        failures += store_until_stored(&provider, &batch);
        accepted.extend(batch.iter().map(|e| e.id));
    }
    let disconnects = provider.stats().expect("stats").provider_specific["disconnects"].as_u64();
    assert!(disconnects >= Some(3), "three cuts, {disconnects:?} disconnects ({failures} failed stores)");
    assert_stored_once(&provider, &scope, &accepted);
    let received = receive_all(&*source, accepted.len());
    assert_eq!(received.len(), accepted.len());
}

/// A server that stops answering (the connection stays open, nothing comes back) makes every call
/// fail as `Unavailable` within its bound, never hang; `close` returns within its own bound; once
/// the server answers again, calls succeed.
#[test]
fn a_server_that_stops_answering_fails_calls_within_their_bound() {
    let _serial = SERIAL.lock();
    let proxy = Proxy::start();
    let (_backend, provider, scope, source) = through(&proxy);
    let event = Arc::new(scope.event("hang.tick"));

    proxy.freeze(true);
    let bounded = |what: &str, limit: Duration, call: &dyn Fn() -> Result<(), ProviderError>| {
        let started = Instant::now();
        let error = call().expect_err(what);
        assert!(error.is_transient(), "{what}: {error}");
        assert!(started.elapsed() < limit, "{what} took {:?}", started.elapsed());
    };
    bounded("store_batch", Duration::from_secs(6), &|| {
        provider.store_batch(std::slice::from_ref(&event), None)
    });
    bounded("get", Duration::from_secs(6), &|| provider.get(event.id).map(drop));
    bounded("fetch", Duration::from_secs(6), &|| source.fetch(10, Duration::from_millis(500)).map(drop));
    bounded("stats", Duration::from_secs(6), &|| provider.stats().map(drop));

    proxy.freeze(false);
    let deadline = Instant::now() + RECOVER;
    while let Err(error) = provider.store_batch(std::slice::from_ref(&event), None) {
        assert!(error.is_transient() && Instant::now() < deadline, "{error}");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(provider.get(event.id).expect("get").map(|e| e.id), Some(event.id));

    proxy.freeze(true);
    let started = Instant::now();
    let _ = provider.close();
    assert!(started.elapsed() < Duration::from_secs(5), "close took {:?}", started.elapsed());
    proxy.freeze(false);
}
