//! Reading a stretch of a stream: an ephemeral consumer that acknowledges nothing, pulled in pages
//! until it has handed out as many messages as were pending when it was made.
//!
//! The server does the selecting that subjects and positions allow — a filter subject, a start
//! sequence or time, the last message per subject — so only those messages cross the network. A
//! scan that is abandoned (its call timed out) leaves a consumer the server removes after
//! [`INACTIVE`].

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::Shared;
use super::connection::{Empty, RawMessage, api, pull, refused};
use crate::error::ProviderError;

/// How long the server keeps a scan's consumer after its last pull.
const INACTIVE: Duration = Duration::from_secs(30);

/// Most messages one pull asks for.
const PAGE: usize = 1000;

/// Where a scan starts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Start {
    /// The first message.
    All,
    /// The first message at or after this sequence.
    Sequence(u64),
    /// The first message the server stored at or after this time.
    Time(Timestamp),
    /// Only the last message of each subject.
    LastPerSubject,
}

#[derive(Serialize)]
struct CreateConsumer<'a> {
    stream_name: &'a str,
    config: ScanConsumer<'a>,
}

#[derive(Serialize)]
struct ScanConsumer<'a> {
    deliver_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    opt_start_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    opt_start_time: Option<String>,
    ack_policy: &'static str,
    replay_policy: &'static str,
    filter_subject: &'a str,
    inactive_threshold: u64,
    mem_storage: bool,
    num_replicas: usize,
}

#[derive(Deserialize)]
struct Created {
    name: String,
    num_pending: u64,
}

/// An open scan of one stream.
pub(super) struct Scan<'a> {
    shared: &'a Shared,
    operation: &'static str,
    stream: String,
    consumer: String,
    /// Messages still to hand out of those pending at the start.
    remaining: u64,
}

impl<'a> Scan<'a> {
    /// Starts a scan of `stream`'s messages on subjects matching `filter`, from `start`.
    pub(super) async fn open(
        shared: &'a Shared,
        operation: &'static str,
        stream: &str,
        filter: &str,
        start: Start,
    ) -> Result<Self, ProviderError> {
        let (deliver_policy, opt_start_seq, opt_start_time) = match start {
            Start::All => ("all", None, None),
            Start::Sequence(seq) => ("by_start_sequence", Some(seq.max(1)), None),
            Start::Time(at) => ("by_start_time", None, Some(at.to_string())),
            Start::LastPerSubject => ("last_per_subject", None, None),
        };
        let request = CreateConsumer {
            stream_name: stream,
            config: ScanConsumer {
                deliver_policy,
                opt_start_seq,
                opt_start_time,
                ack_policy: "none",
                replay_policy: "instant",
                filter_subject: filter,
                inactive_threshold: u64::try_from(INACTIVE.as_nanos()).unwrap_or(u64::MAX),
                mem_storage: true,
                num_replicas: 1,
            },
        };
        let created: Result<Created, _> =
            api(&shared.conn.js, operation, format!("CONSUMER.CREATE.{stream}"), &request).await?;
        let created =
            created.map_err(|error| refused(operation, &format!("scan of stream {stream}"), &error))?;
        Ok(Self {
            shared,
            operation,
            stream: stream.to_owned(),
            consumer: created.name,
            remaining: created.num_pending,
        })
    }

    /// The next messages, at most `max`; empty once the scan is over.
    pub(super) async fn next(&mut self, max: usize) -> Result<Vec<RawMessage>, ProviderError> {
        let batch = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(max).min(PAGE);
        if batch == 0 {
            return Ok(Vec::new());
        }
        let conn = &self.shared.conn;
        let delivered =
            pull(&conn.client, self.operation, &self.stream, &self.consumer, batch, conn.request_timeout)
                .await?;
        if delivered.is_empty() {
            // Messages counted at the start and removed since (deleted, expired).
            self.remaining = 0;
        }
        self.remaining = self.remaining.saturating_sub(delivered.len() as u64);
        Ok(delivered
            .into_iter()
            .map(|d| RawMessage {
                seq: d.seq,
                subject: d.message.subject.to_string(),
                headers: d.message.headers,
                payload: d.message.payload,
            })
            .collect())
    }

    /// Every remaining message.
    pub(super) async fn rest(&mut self) -> Result<Vec<RawMessage>, ProviderError> {
        let mut all = Vec::new();
        loop {
            let page = self.next(PAGE).await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Removes the scan's consumer; a failure only leaves it to expire.
    pub(super) async fn close(self) {
        #[derive(Deserialize)]
        struct Deleted {}
        let subject = format!("CONSUMER.DELETE.{}.{}", self.stream, self.consumer);
        let deleted: Result<Result<Deleted, _>, _> =
            api(&self.shared.conn.js, self.operation, subject, &Empty {}).await;
        if !matches!(deleted, Ok(Ok(_))) {
            tracing::debug!(stream = %self.stream, consumer = %self.consumer, "nats provider: scan consumer left to expire");
        }
    }
}
