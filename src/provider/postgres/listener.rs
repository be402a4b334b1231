//! The listener: one connection per provider that `LISTEN`s on the channel and wakes the inbound
//! sources when a batch is stored, reconnecting with backoff when the connection drops.
//!
//! A notification is only a hint that there is something to fetch; sources find events by
//! querying, so a notification lost while the listener reconnects costs latency, never an event:
//! sources also poll every [`poll_interval`](super::PostgresConfig::poll_interval), and the
//! listener wakes them all once it is listening again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::backend::listener_backoff;
use super::ident::Ident;
use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// Counts for [`ProviderStats::provider_specific`](crate::ProviderStats::provider_specific).
#[derive(Debug, Default)]
pub(super) struct ListenerStats {
    /// Notifications received.
    pub(super) notifications: AtomicU64,
    /// Times the listener connected and began listening (1 after the first success).
    pub(super) sessions: AtomicU64,
    /// Connection attempts that failed, or sessions that ended.
    pub(super) failures: AtomicU64,
}

/// Listens on `channel` until the runtime shuts down, bumping `wake` on every notification and
/// every (re)connection.
pub(super) async fn listen(
    pg_config: tokio_postgres::Config,
    channel: Ident,
    connect_timeout: Duration,
    wake: Arc<watch::Sender<u64>>,
    stats: Arc<ListenerStats>,
) {
    let ring = || wake.send_modify(|n| *n = n.wrapping_add(1));
    let mut attempt: u32 = 0;
    loop {
        let outcome = session(&pg_config, &channel, connect_timeout, &ring, &stats).await;
        // Relaxed: counters, read for stats only.
        stats.failures.fetch_add(1, Ordering::Relaxed);
        attempt = if outcome.listened { 1 } else { attempt.saturating_add(1) };
        tracing::warn!(
            channel = channel.as_str(),
            error = %outcome.error,
            attempt,
            "postgres provider: the listener lost its connection; reconnecting"
        );
        ring(); // Whatever was notified meanwhile is found by the sources' next query.
        tokio::time::sleep(listener_backoff(attempt)).await;
    }
}

/// How one listening session ended.
struct Ended {
    /// Whether `LISTEN` had succeeded (so the next attempt starts the backoff over).
    listened: bool,
    error: String,
}

async fn session(
    pg_config: &tokio_postgres::Config,
    channel: &Ident,
    connect_timeout: Duration,
    ring: &impl Fn(),
    stats: &ListenerStats,
) -> Ended {
    let connected = tokio::time::timeout(connect_timeout, pg_config.connect(tokio_postgres::NoTls)).await;
    let (client, mut connection) = match connected {
        Ok(Ok(pair)) => pair,
        Ok(Err(err)) => return Ended { listened: false, error: err.to_string() },
        Err(_) => {
            return Ended { listened: false, error: format!("no connection within {connect_timeout:?}") };
        }
    };
    // An atomic only because the future must be `Send`; one task reads and writes it.
    let listened = AtomicBool::new(false);
    // The connection is driven only by polling it: it carries the LISTEN's reply as well as the
    // notifications.
    let drive = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    stats.notifications.fetch_add(1, Ordering::Relaxed);
                    ring();
                }
                Some(Ok(_)) => {} // A notice: nothing to do.
                Some(Err(err)) => return err.to_string(),
                None => return "the server closed the connection".to_owned(),
            }
        }
    };
    let listening = async {
        match client.batch_execute(&format!("LISTEN {channel}")).await {
            Ok(()) => {
                listened.store(true, Ordering::Relaxed);
                stats.sessions.fetch_add(1, Ordering::Relaxed);
                ring(); // Events stored while not listening are found now.
                std::future::pending::<String>().await
            }
            Err(err) => format!("LISTEN failed: {err}"),
        }
    };
    tokio::select! {
        error = drive => Ended { listened: listened.load(Ordering::Relaxed), error },
        error = listening => Ended { listened: false, error },
    }
}
