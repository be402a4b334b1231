//! What every operation goes through: the provider's own tokio runtime, the connection pool, the
//! bound on every call, reconnecting with backoff, and the mapping of PostgreSQL errors to
//! [`ProviderErrorKind`]s.
//!
//! Callers are OS threads (the broker's writer and inbound threads, users). Each call runs its
//! future on the calling thread with [`Handle::block_on`], while the runtime's worker thread drives
//! the sockets, so calls from several threads proceed concurrently. A caller that is itself inside
//! some tokio runtime is served from a scoped helper thread instead, as a runtime cannot be
//! blocked on from within another.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, TimeoutType,
};
use parking_lot::{Mutex, RwLock};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::NAME;
use super::config::PostgresConfig;
use super::schema::Names;
use crate::error::{ConfigError, ProviderError, ProviderErrorKind};
use crate::provider::closed_error;
use crate::sync::{AtomicBool, Ordering};

/// First wait after a failed connection attempt; doubled after each further failure.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between connection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The runtime, the pool and the provider's validated settings, shared by the provider, its
/// inbound sources and its background tasks.
pub(super) struct Backend {
    pub(super) names: Names,
    pub(super) config: PostgresConfig,
    /// Settings every connection the provider opens uses (the pool's and the listener's).
    pub(super) pg_config: tokio_postgres::Config,
    pool: Pool,
    handle: Handle,
    /// Taken by `close`, which shuts the runtime down.
    runtime: Mutex<Option<Runtime>>,
    /// Held for reading by every call for as long as it runs, for writing by `close` before it
    /// shuts the runtime down: a call never runs on a runtime that is going away.
    gate: RwLock<()>,
    closed: AtomicBool,
    reconnect: Mutex<Reconnect>,
    /// Bumped whenever inbound sources should look for events again: a notification arrived, the
    /// listener reconnected (and may have missed some), or the provider is closing.
    wake: Arc<watch::Sender<u64>>,
}

impl Backend {
    /// Starts the runtime and builds the pool; connects nothing yet.
    pub(super) fn start(names: Names, config: PostgresConfig) -> Result<Self, ProviderError> {
        let pg_config = pg_config(&config).map_err(|e| super::config::invalid_config("connect", e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.runtime_threads.max(1))
            .thread_name("eventbroker-postgres")
            .enable_all()
            .build()
            .map_err(|err| {
                ProviderError::new(
                    NAME,
                    "connect",
                    ProviderErrorKind::Backend(format!("cannot start the runtime: {err}")),
                )
                .with_source(err)
            })?;
        let mut pool_config = pg_config.clone();
        pool_config.options(session_options(pg_config.get_options(), config.operation_timeout));
        let manager = Manager::from_config(
            pool_config,
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(config.operation_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|err| {
                ProviderError::new(
                    NAME,
                    "connect",
                    ProviderErrorKind::Backend(format!("cannot build the pool: {err}")),
                )
            })?;
        Ok(Self {
            names,
            config,
            pg_config,
            pool,
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            gate: RwLock::new(()),
            closed: AtomicBool::new(false),
            reconnect: Mutex::new(Reconnect::default()),
            wake: Arc::new(watch::channel(0).0),
        })
    }

    /// Runs `work` to completion on the runtime, within `limit`: past it the call fails with
    /// [`ProviderErrorKind::Unavailable`] and whatever connection it held is discarded.
    pub(super) fn run<T, F>(
        &self,
        operation: &'static str,
        limit: Duration,
        work: F,
    ) -> Result<T, ProviderError>
    where
        F: Future<Output = Result<T, ProviderError>> + Send,
        T: Send,
    {
        let _running = self.gate.read();
        if self.is_closed() {
            return Err(closed_error(NAME, operation));
        }
        let bounded = async {
            tokio::time::timeout(limit, work)
                .await
                .unwrap_or_else(|_| Err(unavailable(operation, format!("no answer within {limit:?}"))))
        };
        if Handle::try_current().is_err() {
            return self.handle.block_on(bounded);
        }
        // Inside someone's runtime: block a helper thread instead of theirs.
        std::thread::scope(|scope| match scope.spawn(|| self.handle.block_on(bounded)).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    /// [`Backend::run`] with the configured operation timeout.
    pub(super) fn call<T, F>(&self, operation: &'static str, work: F) -> Result<T, ProviderError>
    where
        F: Future<Output = Result<T, ProviderError>> + Send,
        T: Send,
    {
        self.run(operation, self.config.operation_timeout, work)
    }

    /// A pooled connection. While the server is unreachable this fails fast, with
    /// [`ProviderErrorKind::Unavailable`], until the next attempt is due (50 ms after the first
    /// failure, doubling up to 2 s).
    pub(super) async fn conn(&self, operation: &'static str) -> Result<Conn, ProviderError> {
        if let Some(reason) = self.reconnect.lock().refusal(Instant::now()) {
            return Err(unavailable(operation, reason));
        }
        match self.pool.get().await {
            Ok(object) => {
                self.reconnect.lock().succeeded();
                Ok(Conn { object: Some(object) })
            }
            Err(PoolError::Timeout(TimeoutType::Wait)) => Err(unavailable(
                operation,
                format!(
                    "all {} pooled connections stayed busy for {:?}",
                    self.pool.status().max_size,
                    self.config.operation_timeout
                ),
            )),
            Err(PoolError::Closed) => Err(closed_error(NAME, operation)),
            Err(err) => {
                // The server's refusal (too many connections, a role or database that does not
                // exist) is in the driver's error, which the pool's text only calls "db error".
                let detail = match &err {
                    PoolError::Backend(pg) => describe(pg),
                    other => other.to_string(),
                };
                let reason = format!("cannot connect: {detail}");
                self.reconnect.lock().failed(Instant::now(), &reason);
                Err(unavailable(operation, reason).with_source(err))
            }
        }
    }

    /// Runs `statement` (prepared once per connection) on a pooled connection; the rows affected.
    pub(super) async fn execute(
        &self,
        operation: &'static str,
        table: &str,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, ProviderError> {
        let fail = |err| Self::error(operation, table, err);
        let conn = self.conn(operation).await?;
        let prepared = conn.prepare_cached(statement).await.map_err(fail)?;
        let affected = conn.execute(&prepared, params).await.map_err(fail)?;
        conn.release();
        Ok(affected)
    }

    /// Runs the query `statement` (prepared once per connection) on a pooled connection.
    pub(super) async fn query(
        &self,
        operation: &'static str,
        table: &str,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, ProviderError> {
        let fail = |err| Self::error(operation, table, err);
        let conn = self.conn(operation).await?;
        let prepared = conn.prepare_cached(statement).await.map_err(fail)?;
        let rows = conn.query(&prepared, params).await.map_err(fail)?;
        conn.release();
        Ok(rows)
    }

    /// The error for `err`, raised by `operation` on `table`.
    pub(super) fn error(operation: &'static str, table: &str, err: tokio_postgres::Error) -> ProviderError {
        let message = format!("{table}: {}", describe(&err));
        let kind = if is_transient(&err) {
            ProviderErrorKind::Unavailable(message)
        } else {
            ProviderErrorKind::Backend(message)
        };
        ProviderError::new(NAME, operation, kind).with_source(err)
    }

    /// Whether `close` has begun.
    pub(super) fn is_closed(&self) -> bool {
        // Acquire: pairs with the Release store in `close`, so a call that sees the flag also sees
        // the wake-up `close` sent before taking the gate.
        self.closed.load(Ordering::Acquire)
    }

    /// A receiver of wake-ups for inbound sources.
    pub(super) fn wake_ups(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// What the listener bumps to wake the inbound sources.
    pub(super) fn wake_sender(&self) -> Arc<watch::Sender<u64>> {
        Arc::clone(&self.wake)
    }

    /// Tells every waiting inbound source to look again.
    pub(super) fn wake_all(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs `task` on the runtime in the background (the listener, the cleanup timer); it ends
    /// when the runtime shuts down.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(task);
    }

    /// How many pooled connections exist and how many are idle.
    pub(super) fn pool_status(&self) -> (usize, usize) {
        let status = self.pool.status();
        (status.size, status.available)
    }

    /// Refuses every later call, waits for the calls running now (each bounded by its timeout),
    /// closes the pool and shuts the runtime down, aborting the background tasks.
    pub(super) fn close(&self) {
        // Release: see `is_closed`.
        if self.closed.swap(true, Ordering::Release) {
            return;
        }
        self.wake_all(); // Waiting fetches notice the flag at once instead of at their deadline.
        let exclusive = self.gate.write();
        self.pool.close();
        let runtime = self.runtime.lock().take();
        drop(exclusive);
        if let Some(runtime) = runtime {
            if Handle::try_current().is_ok() {
                runtime.shutdown_background(); // A runtime cannot wait inside another.
            } else {
                runtime.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

/// A pooled connection. Returned to the pool only through [`Conn::release`], after an operation
/// ended cleanly; dropped any other way (an error, a timeout, a panic, a cancelled future) it is
/// closed instead, so a connection left mid-transaction or mid-`COPY` is never reused.
pub(super) struct Conn {
    object: Option<Object>,
}

impl Conn {
    /// Hands the connection back to the pool for reuse.
    pub(super) fn release(mut self) {
        drop(self.object.take());
    }
}

impl Deref for Conn {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        self.object.as_ref().expect("present until release or drop")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        self.object.as_mut().expect("present until release or drop")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            drop(Object::take(object)); // Detached from the pool: the connection closes.
        }
    }
}

/// When the next connection attempt may be made, after failures.
#[derive(Default)]
struct Reconnect {
    next_attempt: Option<Instant>,
    delay: Duration,
    last_error: String,
}

impl Reconnect {
    /// Why a connection attempt may not be made now, if it may not.
    fn refusal(&self, now: Instant) -> Option<String> {
        let next = self.next_attempt.filter(|&at| at > now)?;
        Some(format!("reconnecting, next attempt in {:?}; last attempt: {}", next - now, self.last_error))
    }

    fn failed(&mut self, now: Instant, error: &str) {
        self.delay = if self.delay.is_zero() { RECONNECT_FIRST } else { (self.delay * 2).min(RECONNECT_MAX) };
        self.next_attempt = now.checked_add(self.delay);
        error.clone_into(&mut self.last_error);
    }

    fn succeeded(&mut self) {
        self.next_attempt = None;
        self.delay = Duration::ZERO;
    }
}

/// The delay before the listener's `attempt`-th reconnection (1-based): 50 ms doubling to 2 s, with
/// up to a quarter of random jitter so listeners of many instances do not reconnect in lockstep.
pub(super) fn listener_backoff(attempt: u32) -> Duration {
    let base = RECONNECT_FIRST.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(RECONNECT_MAX);
    base + base.mul_f64(fastrand::f64() / 4.0)
}

pub(super) fn unavailable(operation: &'static str, reason: String) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::Unavailable(reason))
}

/// What went wrong, in words: the server's message and SQLSTATE when the server refused, else the
/// driver's error with what it wraps (an I/O error's own words, say).
fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match std::error::Error::source(err) {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}

/// Whether retrying may help: the connection failed, the server is shutting down or overloaded,
/// or the statement lost a race (serialization failure, deadlock, lock or statement timeout).
fn is_transient(err: &tokio_postgres::Error) -> bool {
    let Some(code) = err.code() else {
        // No SQLSTATE: the socket or the protocol failed, not the statement.
        return true;
    };
    let code = code.code();
    matches!(&code[..2], "08" | "53" | "58")
        || matches!(code, "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "25006")
}

/// The connection settings from `config.url`, with the provider's timeouts, keepalives and
/// application name.
fn pg_config(config: &PostgresConfig) -> Result<tokio_postgres::Config, ConfigError> {
    let mut pg: tokio_postgres::Config = config
        .url
        .parse()
        .map_err(|err| ConfigError::new("url", format!("not a PostgreSQL connection string: {err}")))?;
    pg.connect_timeout(config.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .application_name(&config.application_name);
    Ok(pg)
}

/// `existing` connection options plus the server-side bounds of the pool's sessions, both the
/// operation timeout `timeout`:
/// - `statement_timeout`: the server gives up on a statement when the caller does, instead of
///   running it on.
/// - `idle_in_transaction_session_timeout`: the server ends a session left idle inside a
///   transaction, so a provider that stalls mid-transaction (a process paused, a network
///   partition its TCP connection outlives) holds its locks, and the horizon every inbound
///   source reads below, for no longer than that. A call that stays healthy never leaves a
///   transaction idle so long: it gives up after `timeout` and closes its connection.
fn session_options(existing: Option<&str>, timeout: Duration) -> String {
    let millis = timeout.as_millis().max(1);
    let bounds = format!("-c statement_timeout={millis} -c idle_in_transaction_session_timeout={millis}");
    match existing {
        Some(options) if !options.is_empty() => format!("{options} {bounds}"),
        _ => bounds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::postgres::PostgresProvider;
    use crate::redact::assert_hidden;

    /// A connection string the driver refuses, and a server that cannot be reached (nothing
    /// listens on port 1), in both forms: no error shows the password.
    #[test]
    fn connect_errors_keep_the_password_out() {
        let connect = |url: &str| {
            let config =
                PostgresConfig { connect_timeout: Duration::from_secs(2), ..PostgresConfig::new(url) };
            PostgresProvider::connect(config).expect_err(url)
        };
        for url in [
            "postgresql://app:s3cret@127.0.0.1:port/test",
            "host=127.0.0.1 user=app password=s3cret dbname=test bogus=1",
            "host=127.0.0.1 user=app password='s3cret",
        ] {
            let error = connect(url);
            assert!(error.to_string().contains("not a PostgreSQL connection string"), "{error}");
            assert_hidden(&error, "s3cret");
        }
        for url in [
            "postgresql://app:s3cret@127.0.0.1:1/test",
            "postgresql://s3cret@127.0.0.1:1/test",
            "host=127.0.0.1 port=1 user=app password=s3cret dbname=test",
        ] {
            let error = connect(url);
            assert!(error.to_string().contains("cannot connect"), "{error}");
            assert_hidden(&error, "s3cret");
        }
    }
}
