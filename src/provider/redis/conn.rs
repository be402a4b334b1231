//! Connections: a small pool of blocking connections, each call bounded by socket timeouts, and
//! reconnection with exponential backoff.
//!
//! A connection that fails with anything but a reply from the server (an I/O error, a timeout, a
//! protocol error) is dropped, together with every idle one (they lead to the same server, which
//! most likely went away). The next call connects again, unless the last attempt failed less than
//! the current backoff ago (50 ms doubling to [`RedisConfig::max_backoff`]), in which case it fails
//! at once: a down server costs a caller one connect timeout per backoff period, not one per call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{Client, Connection, ErrorKind, RedisError, ServerErrorKind};

use super::{NAME, RedisConfig};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::redact::redact;

/// The first wait after a failed connect.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 8;

/// How connections are made and bounded.
#[derive(Debug, Clone)]
pub(super) struct Dialer {
    client: Client,
    timeout: Duration,
    client_name: String,
    max_backoff: Duration,
}

impl Dialer {
    pub(super) fn new(config: &RedisConfig) -> Result<Self, ProviderError> {
        if config.url.starts_with("rediss://") {
            // rustls needs a process-wide crypto provider; installing one that is already installed
            // (by us or by the application) is refused, harmlessly.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = Client::open(config.url.as_str()).map_err(|error| {
            ProviderError::new(
                NAME,
                "connect",
                ProviderErrorKind::InvalidInput(format!("invalid Redis URL: {}", redact(&error.to_string()))),
            )
        })?;
        Ok(Self {
            client,
            timeout: config.timeout,
            client_name: config.client_name.clone(),
            max_backoff: config.max_backoff.max(FIRST_BACKOFF),
        })
    }

    /// A new connection, its setup bounded by the timeout; every later read and write is bounded by
    /// it too.
    pub(super) fn dial(&self) -> Result<Connection, RedisError> {
        let mut conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        redis::cmd("CLIENT").arg("SETNAME").arg(&self.client_name).exec(&mut conn)?;
        Ok(conn)
    }

    /// The per-call bound.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The server and database as the URL names them, credentials left out: `127.0.0.1:6379 db 0`
    /// (the port and database filled in when the URL leaves them to their defaults).
    pub(super) fn server(&self) -> String {
        let info = self.client.get_connection_info();
        format!("{} db {}", info.addr(), info.redis_settings().db())
    }
}

/// When the next connect may be tried.
#[derive(Debug)]
pub(super) struct Backoff {
    max: Duration,
    next: Duration,
    not_before: Option<Instant>,
}

impl Backoff {
    pub(super) fn new(max: Duration) -> Self {
        Self { max, next: FIRST_BACKOFF, not_before: None }
    }

    /// `Err` with the time left while a failed connect is too recent to try again.
    pub(super) fn check(&self, now: Instant) -> Result<(), Duration> {
        match self.not_before {
            Some(at) if at > now => Err(at - now),
            _ => Ok(()),
        }
    }

    pub(super) fn failed(&mut self, now: Instant) {
        self.not_before = now.checked_add(self.next);
        self.next = self.next.saturating_mul(2).min(self.max);
    }

    pub(super) fn succeeded(&mut self) {
        self.next = FIRST_BACKOFF;
        self.not_before = None;
    }
}

/// Shared, reconnecting access to the server for every call but the inbound fetches (which block,
/// and so have a connection each).
pub(super) struct Pool {
    dialer: Dialer,
    idle: Mutex<Vec<Connection>>,
    backoff: Mutex<Backoff>,
    /// Set when a connection was dropped after a failure: the next one made replaces it.
    lost: AtomicBool,
    /// Connections made to replace one lost to a failure, over the provider's life (the pool's
    /// and the inbound sources' together).
    pub(super) reconnects: AtomicU64,
}

impl Pool {
    pub(super) fn new(dialer: Dialer) -> Self {
        let backoff = Backoff::new(dialer.max_backoff);
        Self {
            dialer,
            idle: Mutex::new(Vec::new()),
            backoff: Mutex::new(backoff),
            lost: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
        }
    }

    pub(super) fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Runs `call` on a pooled connection. `operation` and `what` (the key, stream or group the
    /// call is about) name it in errors.
    pub(super) fn run<T>(
        &self,
        operation: &'static str,
        what: &str,
        call: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, ProviderError> {
        let mut conn = self.take(operation)?;
        match call(&mut conn) {
            Ok(value) => {
                self.give_back(conn);
                Ok(value)
            }
            Err(error) => {
                if keeps_connection(&error) {
                    self.give_back(conn);
                } else {
                    drop(conn);
                    self.idle.lock().clear();
                    // Relaxed: a statistic's flag.
                    self.lost.store(true, Ordering::Relaxed);
                }
                Err(map_error(operation, what, &error))
            }
        }
    }

    fn take(&self, operation: &'static str) -> Result<Connection, ProviderError> {
        if let Some(conn) = self.idle.lock().pop() {
            return Ok(conn);
        }
        connect(&self.dialer, &self.backoff, &self.lost, &self.reconnects, operation)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Drops every idle connection (at close).
    pub(super) fn clear(&self) {
        self.idle.lock().clear();
    }
}

/// A new connection through `backoff`: fails at once while a recent attempt failed. Counted in
/// `reconnects` when `lost` says it replaces a connection lost to a failure.
pub(super) fn connect(
    dialer: &Dialer,
    backoff: &Mutex<Backoff>,
    lost: &AtomicBool,
    reconnects: &AtomicU64,
    operation: &'static str,
) -> Result<Connection, ProviderError> {
    let now = Instant::now();
    if let Err(left) = backoff.lock().check(now) {
        return Err(ProviderError::new(
            NAME,
            operation,
            ProviderErrorKind::Unavailable(format!(
                "not connected; the next connection attempt is in {} ms",
                left.as_millis()
            )),
        ));
    }
    match dialer.dial() {
        Ok(conn) => {
            // Relaxed: a statistic and its flag.
            if lost.swap(false, Ordering::Relaxed) {
                reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!("redis provider: reconnected");
            }
            backoff.lock().succeeded();
            Ok(conn)
        }
        Err(error) => {
            backoff.lock().failed(now);
            lost.store(true, Ordering::Relaxed);
            tracing::warn!(error = %redact(&error.to_string()), "redis provider: cannot connect");
            Err(map_error(operation, "connect", &error))
        }
    }
}

/// Whether the connection is still in step with the server after `error`: only when the server
/// answered with an error reply.
pub(super) fn keeps_connection(error: &RedisError) -> bool {
    matches!(error.kind(), ErrorKind::Server(_) | ErrorKind::UnexpectedReturnType)
}

/// Error codes of refusals that pass without anyone changing the request: memory freed (`OOM`), a
/// script that ended (`BUSY`), replicas caught up (`NOREPLICAS`, under `min-replicas-to-write`), a
/// snapshot that succeeded again (`MISCONF`, under `stop-writes-on-bgsave-error`).
const TRANSIENT_CODES: [&str; 4] = ["OOM", "BUSY", "NOREPLICAS", "MISCONF"];

/// Our error for a failed Redis call: `Unavailable` (transient) when the server cannot be reached,
/// did not answer in time or says to try later; `Backend` otherwise.
pub(super) fn map_error(operation: &'static str, what: &str, error: &RedisError) -> ProviderError {
    let transient = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
        || error.code().is_some_and(|code| TRANSIENT_CODES.contains(&code));
    let text = format!("{what}: {}", redact(&error.to_string()));
    let kind =
        if transient { ProviderErrorKind::Unavailable(text) } else { ProviderErrorKind::Backend(text) };
    ProviderError::new(NAME, operation, kind).with_source(error.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_bound_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(300));
        let t0 = Instant::now();
        assert!(backoff.check(t0).is_ok());
        backoff.failed(t0);
        assert_eq!(backoff.check(t0), Err(Duration::from_millis(50)));
        assert!(backoff.check(t0 + Duration::from_millis(50)).is_ok());
        for _ in 0..5 {
            backoff.failed(t0);
        }
        assert_eq!(backoff.check(t0), Err(Duration::from_millis(300)), "bounded");
        backoff.succeeded();
        assert!(backoff.check(t0).is_ok());
    }

    /// The error a server's reply line makes, as a call returns it.
    fn server_error(line: &str) -> RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .and_then(redis::Value::extract_error)
            .expect_err("an error reply")
    }

    #[test]
    fn refusals_that_pass_are_transient_and_the_others_are_not() {
        for line in [
            "LOADING Redis is loading the dataset in memory",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "BUSY Redis is busy running a script.",
            "NOREPLICAS Not enough good replicas to write.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "READONLY You can't write against a read only replica.",
        ] {
            assert!(map_error("store_batch", "k", &server_error(line)).is_transient(), "{line}");
        }
        for line in [
            "ERR Error running script",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOPERM this user has no permissions to run the 'evalsha' command",
            "BUSYGROUP Consumer Group name already exists",
        ] {
            assert!(!map_error("store_batch", "k", &server_error(line)).is_transient(), "{line}");
        }
    }
}
