//! What the PostgreSQL test binaries share: a [`TestBackend`] that gives each test its own schema
//! on the server at `EVENTBROKER_POSTGRES_URL` (default: `127.0.0.1:5432`, database `test`, user
//! `postgres`), and dropped when the test ends, and a way to run SQL beside the provider.

#![allow(dead_code, reason = "each test binary uses its own part of this")]

use std::sync::Arc;
use std::time::Duration;

use eventbroker::provider::postgres::{PostgresConfig, PostgresProvider, tokio_postgres};
use eventbroker::testing::conformance::Scope;
use eventbroker::testing::conformance::TestBackend;
use eventbroker::{Event, Inbound, InboundConfig, Provider};

/// The server every test uses; only loopback addresses.
pub fn url() -> String {
    std::env::var("EVENTBROKER_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned())
}

/// A provider with `config`.
///
/// # Panics
/// If the server is not up (`scripts/ensure-service postgres` starts it).
pub fn connect(config: PostgresConfig) -> PostgresProvider {
    PostgresProvider::connect(config)
        .expect("connect to the PostgreSQL test server (scripts/ensure-service postgres)")
}

/// Events shared, as `store_batch` takes them.
pub fn shared(events: &[Event]) -> Vec<Arc<Event>> {
    events.iter().cloned().map(Arc::new).collect()
}

/// A fan-out source of `scope`'s instance `name`, filtered to the scope.
pub fn source(provider: &PostgresProvider, scope: &Scope, name: &str) -> Arc<dyn Inbound> {
    let config = InboundConfig::new(scope.name(name), scope.instance(name));
    let source = provider.open_inbound(&config).expect("open_inbound");
    source.set_filter(&[scope.all()]).expect("set_filter");
    source
}

/// A schema of its own for one test, with an application name that marks every connection its
/// providers open, so a fault test terminates only its own. Dropped with the backend.
#[derive(Debug)]
pub struct PostgresBackend {
    pub schema: String,
    pub application_name: String,
}

impl PostgresBackend {
    pub fn new() -> Self {
        let tag = format!("{:016x}", fastrand::u64(..));
        Self { schema: format!("eb_test_{tag}"), application_name: format!("eb-test-{tag}") }
    }

    /// Settings for a provider on this backend's schema: background cleanup off (tests run it
    /// themselves), a short poll interval.
    pub fn config(&self) -> PostgresConfig {
        PostgresConfig {
            cleanup_interval: None,
            poll_interval: Duration::from_millis(100),
            ..PostgresConfig::new(url())
                .with_schema(&self.schema)
                .with_application_name(&self.application_name)
        }
    }

    pub fn provider(&self) -> PostgresProvider {
        connect(self.config())
    }

    /// `<schema>.<name>`.
    pub fn qualified(&self, name: &str) -> String {
        format!("{}.{name}", self.schema)
    }
}

impl Default for PostgresBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBackend for PostgresBackend {
    fn connect(&self) -> Arc<dyn Provider> {
        Arc::new(self.provider())
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        let drop_schema = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        if let Err(error) = Sql::connect().and_then(|sql| sql.batch(&drop_schema)) {
            eprintln!("could not drop test schema {}: {error}", self.schema);
        }
    }
}

/// A plain tokio-postgres connection on a runtime of its own, for what tests do beside the
/// provider: open transactions, terminate connections, look at the tables.
pub struct Sql {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

pub type SqlResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

impl Sql {
    pub fn connect() -> SqlResult<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        })?;
        Ok(Self { runtime, client })
    }

    pub fn batch(&self, statements: &str) -> SqlResult<()> {
        Ok(self.runtime.block_on(self.client.batch_execute(statements))?)
    }

    /// The first column of every row `query` returns, as `i64`s.
    pub fn numbers(
        &self,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> SqlResult<Vec<i64>> {
        let rows = self.runtime.block_on(self.client.query(query, params))?;
        Ok(rows.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?)
    }

    /// Terminates the server processes of connections named `application_name` whose last query
    /// starts with `query_prefix`; returns how many.
    pub fn terminate(&self, application_name: &str, query_prefix: &str) -> SqlResult<usize> {
        // The targets are chosen first and only then terminated: in a single WHERE the planner may
        // call pg_terminate_backend before the conditions that exclude other sessions.
        let killed = self.numbers(
            "WITH targets AS MATERIALIZED (
                 SELECT pid FROM pg_stat_activity
                 WHERE application_name = $1 AND starts_with(query, $2) AND pid <> pg_backend_pid()
             )
             SELECT pid::bigint FROM targets WHERE pg_terminate_backend(pid)",
            &[&application_name, &query_prefix],
        )?;
        Ok(killed.len())
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    pub fn client(&mut self) -> &mut tokio_postgres::Client {
        &mut self.client
    }
}

/// A TCP proxy to the test server that can stop passing bytes while every connection through it
/// stays open: a client process stalled, or a network partition its TCP connections outlive.
/// Stopped when dropped (connections through it end when their clients close them).
pub struct StallingProxy {
    port: u16,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl StallingProxy {
    pub fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let server: tokio_postgres::Config = url().parse().expect("the test server's connection string");
        let host = match server.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            other => panic!("the proxy needs a TCP host, not {other:?}"),
        };
        let server = format!("{host}:{}", server.get_ports().first().copied().unwrap_or(5432));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("address").port();
        let (stalled, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (stalled_, stop_) = (Arc::clone(&stalled), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop_.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).expect("blocking");
                let Ok(upstream) = std::net::TcpStream::connect(&server) else { continue };
                for (from, to) in [
                    (client.try_clone().expect("clone"), upstream.try_clone().expect("clone")),
                    (upstream, client),
                ] {
                    let stalled = Arc::clone(&stalled_);
                    std::thread::spawn(move || pipe(from, to, &stalled));
                }
            }
        });
        Self { port, stalled, stop }
    }

    /// A connection string to the server through this proxy.
    pub fn url(&self) -> String {
        let server: tokio_postgres::Config = url().parse().expect("the test server's connection string");
        let user = server.get_user().map(|user| format!(" user={user}")).unwrap_or_default();
        let dbname = server.get_dbname().map(|dbname| format!(" dbname={dbname}")).unwrap_or_default();
        format!("host=127.0.0.1 port={}{user}{dbname}", self.port)
    }

    /// Stops (`true`) or resumes passing bytes, both ways, on every connection.
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.stall(false);
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies `from` to `to`, holding what it read while `stalled`, until either side closes.
fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream, stalled: &std::sync::atomic::AtomicBool) {
    use std::io::{Read, Write};
    let mut buf = [0_u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
