//! The connection to the server: the provider's own runtime, the client, and the few primitives
//! every part builds on — bounded calls from synchronous code, JetStream API requests, direct
//! gets, windows of publishes awaiting their acknowledgements, and pull requests.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::config::{NatsAuth, NatsConfig};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::closed_error;
use crate::redact::redact_url_list;

/// The provider's name in errors and stats.
pub(super) const NAME: &str = "nats";

/// Extra time a synchronous caller waits beyond the bound it gave the runtime, so a bounded
/// future always reports its own timeout first.
const GRACE: Duration = Duration::from_millis(500);

/// A transient failure: the server is unreachable, restarting, or did not answer in time.
pub(super) fn unavailable(operation: &'static str, what: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::Unavailable(what.to_string()))
}

/// A failure retrying will not fix.
pub(super) fn backend(operation: &'static str, what: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::Backend(what.to_string()))
}

/// The server's answer to a JetStream API request that it refused.
pub(super) fn refused(operation: &'static str, what: &str, error: &jetstream::Error) -> ProviderError {
    // 503: JetStream is starting, has no quorum, or is restoring: come back later.
    let message = format!("{what}: {error}");
    let outcome =
        if error.code() == 503 { unavailable(operation, message) } else { backend(operation, message) };
    outcome.with_source(error.clone())
}

/// The server version, as `(major, minor, patch)`.
pub(super) type Version = (u64, u64, u64);

fn parse_version(text: &str) -> Version {
    let mut parts = text.split(['.', '-']).map(|part| part.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// A message as the server keeps it, from a direct get or a scan.
#[derive(Debug)]
pub(super) struct RawMessage {
    pub(super) seq: u64,
    pub(super) subject: String,
    pub(super) headers: Option<HeaderMap>,
    pub(super) payload: Bytes,
}

/// The value of header `name` in `headers`. Names are parsed, so the client's well-known names
/// (`Nats-Sequence`, `KV-Operation`) match whatever spelling they arrived in.
fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    let name: async_nats::header::HeaderName = name.parse().ok()?;
    headers?.get(name).map(async_nats::HeaderValue::as_str)
}

impl RawMessage {
    /// The value of header `name`, if present.
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        header(self.headers.as_ref(), name)
    }
}

/// One message handed out by a consumer, with what its acknowledgement subject says.
#[derive(Debug)]
pub(super) struct Delivered {
    pub(super) message: async_nats::Message,
    /// Where acknowledgements go.
    pub(super) reply: String,
    pub(super) seq: u64,
    /// How many times the consumer has handed it out, this time included.
    pub(super) count: u32,
}

impl Delivered {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        header(self.message.headers.as_ref(), name)
    }
}

/// Reads the stream sequence and delivery count from a JetStream acknowledgement subject, in
/// either layout: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>` or the one
/// with a domain and account hash after `ACK` (12 tokens or more).
fn ack_subject_info(reply: &str) -> Option<(u64, u32)> {
    let tokens: Vec<&str> = reply.split('.').collect();
    let first = match tokens.len() {
        9 => 4,
        n if n >= 12 => 6,
        _ => return None,
    };
    if tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    let delivered = tokens[first].parse().ok()?;
    let seq = tokens[first + 1].parse().ok()?;
    Some((seq, delivered))
}

/// Counters of what the connection went through.
#[derive(Debug, Default)]
pub(super) struct ConnectionEvents {
    pub(super) disconnects: AtomicU64,
    pub(super) reconnects: AtomicU64,
}

/// The client, its JetStream context and the runtime that drives them.
pub(super) struct Connection {
    /// Taken at shutdown.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) request_timeout: Duration,
    pub(super) max_in_flight: usize,
    pub(super) version: Version,
    pub(super) events: Arc<ConnectionEvents>,
}

impl Connection {
    /// Starts the runtime and connects, waiting at most `connect_timeout` for the first connection.
    pub(super) fn open(config: &NatsConfig) -> Result<Self, ProviderError> {
        const OPERATION: &str = "connect";
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.runtime_threads)
            .thread_name("eventbroker-nats")
            .enable_all()
            .build()
            .map_err(|error| backend(OPERATION, format!("cannot start the runtime: {error}")))?;
        let events = Arc::new(ConnectionEvents::default());
        let connect = connect(config.clone(), Arc::clone(&events));
        let limit = config.connect_timeout.saturating_add(config.request_timeout);
        let client =
            runtime.block_on(async { tokio::time::timeout(limit, connect).await }).map_err(|_| {
                unavailable(
                    OPERATION,
                    format!("no connection to {} within {limit:?}", redact_url_list(&config.url)),
                )
            })??;
        let version = parse_version(&client.server_info().version);
        let js = {
            // The context spawns its acknowledgement task on the runtime it is built in.
            let _entered = runtime.enter();
            jetstream::ContextBuilder::new()
                .timeout(config.request_timeout)
                .max_ack_inflight(config.max_in_flight.saturating_mul(4).max(4096))
                .build(client.clone())
        };
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            client,
            js,
            request_timeout: config.request_timeout,
            max_in_flight: config.max_in_flight,
            version,
            events,
        })
    }

    /// Whether consumers accept several filter subjects (server 2.10 and later).
    pub(super) fn multi_filter(&self) -> bool {
        self.version >= (2, 10, 0)
    }

    /// Runs `future` on the provider's runtime and waits for it, at most `limit`; a future still
    /// running then is dropped and the call fails as `Unavailable`. Callable from any thread, an
    /// async one included (it then blocks that thread, as every synchronous provider call does).
    pub(super) fn call<T: Send + 'static>(
        &self,
        operation: &'static str,
        limit: Duration,
        future: impl Future<Output = Result<T, ProviderError>> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let bounded = async move {
            tokio::time::timeout(limit, future)
                .await
                .unwrap_or_else(|_| Err(unavailable(operation, format!("no answer within {limit:?}"))))
        };
        if tokio::runtime::Handle::try_current().is_err() {
            // A plain thread drives the future itself; the runtime's threads do the socket I/O.
            return self.handle.block_on(bounded);
        }
        // Inside some runtime `block_on` would panic: hand the future over and wait for it.
        let (tx, rx) = flume::bounded(1);
        self.handle.spawn(async move {
            let _ = tx.send(bounded.await);
        });
        match rx.recv_timeout(limit.saturating_add(GRACE)) {
            Ok(result) => result,
            Err(flume::RecvTimeoutError::Timeout) => {
                Err(unavailable(operation, format!("no answer within {limit:?}")))
            }
            Err(flume::RecvTimeoutError::Disconnected) => Err(closed_error(NAME, operation)),
        }
    }

    /// Flushes what the client buffers, then stops the runtime, waiting at most `limit` for its
    /// tasks. Later calls fail with `Closed`. Idempotent.
    pub(super) fn shutdown(&self, limit: Duration) -> Result<(), ProviderError> {
        let Some(runtime) = self.runtime.lock().take() else { return Ok(()) };
        let client = self.client.clone();
        let flushed = self.call("close", limit, async move {
            client.flush().await.map_err(|error| unavailable("close", format!("flush: {error}")))
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            runtime.shutdown_background();
        } else {
            runtime.shutdown_timeout(limit);
        }
        flushed
    }
}

/// The servers of `url`, a URL or several separated by commas.
pub(super) fn servers(url: &str) -> std::io::Result<Vec<async_nats::ServerAddr>> {
    url.split(',').map(|url| url.trim().parse::<async_nats::ServerAddr>()).collect()
}

/// The servers of `url` with their userinfo taken out, and the credentials it held:
/// `user:password@` or `token@`, percent-decoded. async-nats 0.46 logs every server it dials at
/// debug level as `Debug` of its URL, password or token included, and never sends a URL's
/// credentials to the server: they go in the connect options instead. Errors name no secret.
pub(super) fn split_credentials(
    url: &str,
) -> Result<(Vec<async_nats::ServerAddr>, Option<NatsAuth>), String> {
    let mut credentials: Option<NatsAuth> = None;
    let mut stripped = Vec::new();
    for server in servers(url).map_err(|error| error.to_string())? {
        let (user, password) = (server.username(), server.password());
        if user.is_none() && password.is_none() {
            stripped.push(server);
            continue;
        }
        let decoded = |part: &str| {
            percent_decoded(part).ok_or_else(|| {
                format!(
                    "the credentials of server {}:{} are not valid percent-encoded UTF-8",
                    server.host(),
                    server.port()
                )
            })
        };
        let auth = match password {
            Some(password) => NatsAuth::UserPassword {
                user: decoded(user.unwrap_or_default())?,
                password: decoded(password)?,
            },
            None => NatsAuth::Token(decoded(user.unwrap_or_default())?),
        };
        if credentials.as_ref().is_some_and(|first| *first != auth) {
            // One connection authenticates one way, whichever server it reaches.
            return Err("the servers of the list carry different credentials; give them once".to_owned());
        }
        credentials = Some(auth);
        // The serialized URL percent-encodes an `@` of the userinfo: its first `@` ends it.
        let text = server.as_url_str();
        let host = text.find("://").map_or(0, |scheme| scheme + 3);
        let at = text[host..].find('@').map_or(host, |at| host + at + 1);
        let without = format!("{}{}", &text[..host], &text[at..]);
        stripped.push(without.parse().map_err(|error: std::io::Error| error.to_string())?);
    }
    Ok((stripped, credentials))
}

/// The servers of `config` without the credentials of their URLs, and the credentials the
/// connection uses: [`NatsConfig::auth`], or those of the URLs.
pub(super) fn credentials(
    config: &NatsConfig,
) -> Result<(Vec<async_nats::ServerAddr>, NatsAuth), ProviderError> {
    const OPERATION: &str = "connect";
    // Errors quote the URL with its credentials blanked; the client's own errors name no server.
    let invalid =
        |message: String| ProviderError::new(NAME, OPERATION, ProviderErrorKind::InvalidInput(message));
    let (servers, url_auth) = split_credentials(&config.url).map_err(|error| {
        invalid(format!("invalid server URL in {:?}: {error}", redact_url_list(&config.url)))
    })?;
    match (url_auth, &config.auth) {
        (None, auth) => Ok((servers, auth.clone())),
        (Some(url_auth), NatsAuth::None) => Ok((servers, url_auth)),
        (Some(_), _) => Err(invalid(format!(
            "{:?} carries credentials and so does the auth setting; give them one way",
            redact_url_list(&config.url)
        ))),
    }
}

/// The account the connection is bound to, as the server names it (an account's name, or its
/// public key in operator mode): the answer to `$SYS.REQ.USER.INFO`, which servers from 2.10 on
/// give any client. `None` from an older server (no responder), or when no answer comes within
/// the client's request timeout.
pub(super) async fn account(client: &async_nats::Client) -> Option<String> {
    let message = client.request("$SYS.REQ.USER.INFO", Bytes::new()).await.ok()?;
    account_of(&message.payload)
}

/// The account a `$SYS.REQ.USER.INFO` answer names: `{"data":{"user":…,"account":…}}`.
fn account_of(answer: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        data: Option<UserInfo>,
    }
    #[derive(serde::Deserialize)]
    struct UserInfo {
        account: String,
    }
    let answer: Answer = serde_json::from_slice(answer).ok()?;
    answer.data.map(|info| info.account).filter(|account| !account.is_empty())
}

/// `text` with its `%XX` escapes decoded; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if byte == b'%' {
            let hex = bytes.get(at + 1..at + 3).filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))?;
            // Two hex digits: always a byte.
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            at += 3;
        } else {
            out.push(byte);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Connects with `config`'s credentials, TLS and reconnection policy; counts disconnections and
/// reconnections into `events`.
async fn connect(
    config: NatsConfig,
    events: Arc<ConnectionEvents>,
) -> Result<async_nats::Client, ProviderError> {
    const OPERATION: &str = "connect";
    let max_delay = config.reconnect_max_delay;
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.client_name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
        .event_callback(move |event| {
            let events = Arc::clone(&events);
            async move {
                match event {
                    // Relaxed: independent counters, read only for stats.
                    async_nats::Event::Disconnected => {
                        events.disconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("nats provider: disconnected; reconnecting");
                    }
                    async_nats::Event::Connected => {
                        events.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("nats provider: connected");
                    }
                    other => tracing::debug!(event = %other, "nats provider: connection event"),
                }
            }
        });
    let (servers, auth) = credentials(&config)?;
    options = match &auth {
        NatsAuth::None => options,
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::NKey(seed) => options.nkey(seed.clone()),
        NatsAuth::CredentialsFile(path) => options.credentials_file(path).await.map_err(|error| {
            backend(OPERATION, format!("cannot read credentials file {}: {error}", path.display()))
        })?,
    };
    if let Some(tls) = &config.tls {
        options = options.require_tls(tls.required);
        if let Some(roots) = &tls.root_certificates {
            options = options.add_root_certificates(roots.clone());
        }
        if let Some((cert, key)) = &tls.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if tls.handshake_first {
            options = options.tls_first();
        }
    }
    options.connect(servers).await.map_err(|error| {
        use async_nats::ConnectErrorKind as Kind;
        let message = format!("{}: {error}", redact_url_list(&config.url));
        match error.kind() {
            Kind::TimedOut | Kind::Io | Kind::Dns | Kind::MaxReconnects => unavailable(OPERATION, message),
            Kind::ServerParse | Kind::Authentication | Kind::AuthorizationViolation | Kind::Tls => {
                backend(OPERATION, message)
            }
        }
        .with_source(error)
    })
}

/// 100 ms doubling per attempt up to `max`, with ±25% jitter so instances do not reconnect in step.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
    let base = Duration::from_millis(100).saturating_mul(1 << doublings).min(max);
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Sends a JetStream API request (`$JS.API.<subject>`) and decodes the answer: `Ok(Err(..))` when
/// the server refused it (the caller decides what a refusal means), `Err` when there was no answer.
pub(super) async fn api<T: DeserializeOwned>(
    js: &jetstream::Context,
    operation: &'static str,
    subject: String,
    body: &(impl Serialize + ?Sized),
) -> Result<Result<T, jetstream::Error>, ProviderError> {
    use async_nats::jetstream::context::RequestErrorKind as Kind;
    use async_nats::jetstream::response::Response;
    match js.request::<_, _, Response<T>>(subject.clone(), body).await {
        Ok(Response::Ok(answer)) => Ok(Ok(answer)),
        Ok(Response::Err { error }) => Ok(Err(error)),
        Err(error) => Err(match error.kind() {
            Kind::TimedOut | Kind::NoResponders => {
                unavailable(operation, format!("$JS.API.{subject}: {error}"))
            }
            Kind::Other => backend(operation, format!("$JS.API.{subject}: {error}")),
        }
        .with_source(error)),
    }
}

/// The body of an API request that takes none: `{}`.
#[derive(Debug, Serialize)]
pub(super) struct Empty {}

/// What a direct get looks up.
#[derive(Debug, Serialize)]
pub(super) struct DirectGet<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_by_subj: Option<&'a str>,
}

impl<'a> DirectGet<'a> {
    pub(super) fn seq(seq: u64) -> Self {
        Self { seq: Some(seq), last_by_subj: None }
    }

    pub(super) fn last_on(subject: &'a str) -> Self {
        Self { seq: None, last_by_subj: Some(subject) }
    }
}

/// Reads one message from `stream` (which allows direct gets) without a consumer; `None` when there
/// is no such message.
pub(super) async fn direct_get(
    client: &async_nats::Client,
    operation: &'static str,
    stream: &str,
    what: &DirectGet<'_>,
) -> Result<Option<RawMessage>, ProviderError> {
    let body = serde_json::to_vec(what).map_err(|error| backend(operation, error))?;
    let subject = format!("$JS.API.DIRECT.GET.{stream}");
    let message = client.request(subject, body.into()).await.map_err(|error| {
        unavailable(operation, format!("direct get from stream {stream}: {error}")).with_source(error)
    })?;
    match message.status {
        None | Some(StatusCode::OK) => {}
        Some(StatusCode::NOT_FOUND) => return Ok(None),
        Some(status) => {
            return Err(backend(
                operation,
                format!(
                    "direct get from stream {stream}: {status} {}",
                    message.description.unwrap_or_default()
                ),
            ));
        }
    }
    let seq = header(message.headers.as_ref(), "Nats-Sequence").and_then(|s| s.parse().ok());
    let subject = header(message.headers.as_ref(), "Nats-Subject").map(str::to_owned);
    let (Some(seq), Some(subject)) = (seq, subject) else {
        return Err(backend(
            operation,
            format!("direct get from stream {stream}: answer without sequence or subject"),
        ));
    };
    Ok(Some(RawMessage { seq, subject, headers: message.headers, payload: message.payload }))
}

/// One JetStream publish: where, with which headers, what.
#[derive(Debug, Clone)]
pub(super) struct Publish {
    pub(super) subject: String,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
}

impl Publish {
    /// What the server counts against its `max_payload`: the header block and the body.
    pub(super) fn size(&self) -> usize {
        if self.headers.is_empty() {
            return self.payload.len();
        }
        // `NATS/1.0\r\n`, `<name>: <value>\r\n` per value, `\r\n`.
        let fields: usize = self
            .headers
            .iter()
            .map(|(name, values)| {
                let name: &str = name.as_ref();
                values.iter().map(|value| name.len() + value.as_str().len() + 4).sum::<usize>()
            })
            .sum();
        10 + fields + 2 + self.payload.len()
    }
}

/// How one publish of a window ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Published {
    /// Stored at this sequence; `duplicate` when the server already had its message id and stored
    /// nothing (the sequence is then the first store's).
    Stored { seq: u64, duplicate: bool },
    /// The expected last sequence of its subject did not match: a compare-and-set lost.
    Conflict,
}

/// Publishes every message, keeping at most `max_in_flight` unacknowledged, and returns how each
/// ended, in order. Fails on the first error other than a lost compare-and-set; messages sent
/// before it may be stored.
pub(super) async fn publish_all(
    js: &jetstream::Context,
    operation: &'static str,
    stream: &str,
    max_in_flight: usize,
    messages: Vec<Publish>,
) -> Result<Vec<Published>, ProviderError> {
    let mut outcomes = Vec::with_capacity(messages.len());
    let mut in_flight = FuturesOrdered::new();
    let max_payload = js.client().server_info().max_payload;
    for message in messages {
        if max_payload > 0 && message.size() > max_payload {
            // The server would close the connection on it, and the publish would time out: not a
            // failure a retry can fix.
            return Err(ProviderError::new(
                NAME,
                operation,
                ProviderErrorKind::InvalidInput(format!(
                    "a message of {} bytes to stream {stream} exceeds the server's max_payload of {max_payload}",
                    message.size()
                )),
            ));
        }
        if in_flight.len() >= max_in_flight {
            if let Some(outcome) = in_flight.next().await {
                outcomes.push(acknowledged(operation, stream, outcome)?);
            }
        }
        let publish = PublishMessage::build().payload(message.payload).headers(message.headers);
        let ack = js
            .send_publish(message.subject, publish)
            .await
            .map_err(|error| publish_error(operation, stream, error))?;
        in_flight.push_back(ack.into_future());
    }
    while let Some(outcome) = in_flight.next().await {
        outcomes.push(acknowledged(operation, stream, outcome)?);
    }
    Ok(outcomes)
}

fn acknowledged(
    operation: &'static str,
    stream: &str,
    outcome: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<Published, ProviderError> {
    match outcome {
        Ok(ack) => Ok(Published::Stored { seq: ack.sequence, duplicate: ack.duplicate }),
        Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(Published::Conflict),
        Err(error) => Err(publish_error(operation, stream, error)),
    }
}

fn publish_error(
    operation: &'static str,
    stream: &str,
    error: jetstream::context::PublishError,
) -> ProviderError {
    let message = format!("publish to stream {stream}: {error}");
    match error.kind() {
        // No stream answered: during a restart JetStream is not serving yet.
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => unavailable(operation, message),
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::Other => backend(operation, message),
    }
    .with_source(error)
}

#[derive(Serialize)]
struct PullRequest {
    batch: usize,
    no_wait: bool,
}

/// Asks consumer `consumer` of `stream` for up to `batch` messages available now and collects
/// them, until the batch is full or the server says there are no more (404), or a limit stops it
/// (409: max ack pending, a deleted consumer).
///
/// Requests are never held open on the server (`no_wait`): a 2.9 server left a held request
/// unanswered while a redelivery came due on its consumer (an event given back with a delay, or
/// past its ack wait), and afterwards handed out again an event that had been acknowledged.
/// Callers that want to wait poll instead (see the `inbound` module).
pub(super) async fn pull(
    client: &async_nats::Client,
    operation: &'static str,
    stream: &str,
    consumer: &str,
    batch: usize,
    request_timeout: Duration,
) -> Result<Vec<Delivered>, ProviderError> {
    let where_ = || format!("pull from consumer {consumer} of stream {stream}");
    let inbox = client.new_inbox();
    let mut subscriber = client
        .subscribe(inbox.clone())
        .await
        .map_err(|error| unavailable(operation, format!("{}: {error}", where_())))?;
    let body = serde_json::to_vec(&PullRequest { batch, no_wait: true })
        .map_err(|error| backend(operation, error))?;
    client
        .publish_with_reply(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"), inbox, body.into())
        .await
        .map_err(|error| unavailable(operation, format!("{}: {error}", where_())))?;

    let deadline = tokio::time::Instant::from_std(crate::deadline::from_now(request_timeout));
    let mut delivered = Vec::new();
    while delivered.len() < batch {
        let Ok(next) = tokio::time::timeout_at(deadline, subscriber.next()).await else {
            if delivered.is_empty() {
                return Err(unavailable(
                    operation,
                    format!("{}: no answer within {request_timeout:?}", where_()),
                ));
            }
            // What the server sends later goes unread and is redelivered after the ack wait.
            break;
        };
        let Some(message) = next else { break };
        match message.status {
            None | Some(StatusCode::OK) => {}
            Some(StatusCode::IDLE_HEARTBEAT) => continue,
            // A request the server cannot read is no "nothing now": said so, it is not retried
            // in silence for ever.
            Some(status) if status.as_u16() == 400 => {
                return Err(backend(
                    operation,
                    format!("{}: {status} {}", where_(), message.description.unwrap_or_default()),
                ));
            }
            // 404 nothing more now, 408 expired, 409 a limit: the request is over.
            Some(_) => break,
        }
        let Some(reply) = message.reply.as_ref().map(ToString::to_string) else { continue };
        let Some((seq, count)) = ack_subject_info(&reply) else {
            return Err(backend(operation, format!("{}: unexpected reply subject {reply}", where_())));
        };
        delivered.push(Delivered { message, reply, seq, count });
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::assert_hidden;

    #[test]
    fn ack_subjects_in_both_layouts() {
        assert_eq!(ack_subject_info("$JS.ACK.EVENTS.c1.2.4.4.1796060546091622769.0"), Some((4, 2)));
        assert_eq!(
            ack_subject_info("$JS.ACK.hub.ACCHASH.EVENTS.c1.3.17.9.1796060546091622769.5.tok"),
            Some((17, 3))
        );
        assert_eq!(ack_subject_info("_INBOX.abc"), None);
        assert_eq!(ack_subject_info("$JS.ACK.EVENTS.c1.x.4.4.1.0"), None);
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(parse_version("2.9.10"), (2, 9, 10));
        assert!(parse_version("2.10.0-beta.1") >= (2, 10, 0));
        assert!(parse_version("2.9.25") < (2, 10, 0));
    }

    /// The error of a connection that failed with `url` (the password `hunter2` in it).
    fn connect_error(url: &str, connect_timeout: Duration) -> ProviderError {
        let config = NatsConfig {
            connect_timeout,
            request_timeout: Duration::from_millis(100),
            ..NatsConfig::new(url)
        };
        let Err(error) = Connection::open(&config) else { panic!("{url} connected") };
        error
    }

    /// Refused (nothing listens on port 1), an unreadable URL, or no answer in time: none of the
    /// errors shows the password or token of the URL, whatever form it is written in.
    #[test]
    fn connect_errors_keep_credentials_out() {
        for url in [
            "nats://u:hunter2@127.0.0.1:1",
            "nats://hunter2@127.0.0.1:1",
            "u:hunter2@127.0.0.1:1",
            "nats://127.0.0.1:1,nats://u:hunter2@127.0.0.1:1",
        ] {
            let error = connect_error(url, Duration::from_secs(2));
            assert!(error.to_string().contains("127.0.0.1:1"), "the server is named: {error}");
            assert_hidden(&error, "hunter2");
        }
        let error = connect_error("nats://u:hunter2@127.0.0.1:port", Duration::from_secs(2));
        assert!(error.to_string().contains("invalid server URL"), "{error}");
        assert_hidden(&error, "hunter2");
        // A server that accepts the connection and never says hello: the client waits for it
        // past any bound of its own.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = silent.local_addr().expect("its address").port();
        let error = connect_error(&format!("nats://u:hunter2@127.0.0.1:{port}"), Duration::from_millis(200));
        assert!(error.to_string().contains("no connection to"), "{error}");
        assert_hidden(&error, "hunter2");
    }

    #[test]
    fn url_credentials_are_split_from_the_servers() {
        let split = |url: &str| split_credentials(url).expect("valid");
        let urls = |servers: &[async_nats::ServerAddr]| {
            servers.iter().map(async_nats::ServerAddr::as_url_str).collect::<Vec<_>>().join(",")
        };
        let user = |user: &str, password: &str| NatsAuth::UserPassword {
            user: user.into(),
            password: password.into(),
        };

        let (servers, auth) = split("nats://svc:p%40ss%2Fw%C3%B6rd@127.0.0.1:4333");
        assert_eq!(urls(&servers), "nats://127.0.0.1:4333");
        assert_eq!(auth, Some(user("svc", "p@ss/wörd")));
        let (servers, auth) = split("hunter2@localhost");
        assert_eq!(urls(&servers), "nats://localhost");
        assert_eq!(auth, Some(NatsAuth::Token("hunter2".into())));
        let (servers, auth) = split("tls://u:hunter2@a:1, nats://b:2 ,u:hunter2@[::1]:3");
        assert_eq!(urls(&servers), "tls://a:1,nats://b:2,nats://[::1]:3");
        assert_eq!(auth, Some(user("u", "hunter2")));
        assert!(servers.iter().all(|s| s.username().is_none() && s.password().is_none()));
        assert!(!format!("{servers:?}").contains("hunter2"), "{servers:?}");
        let (servers, auth) = split("nats://127.0.0.1:4222");
        assert_eq!((urls(&servers).as_str(), auth), ("nats://127.0.0.1:4222", None));

        let error = split_credentials("nats://u:hunter2@a,nats://u:other@b").expect_err("two sets");
        assert!(error.contains("different credentials") && !error.contains("hunter2"), "{error}");
        let error = split_credentials("nats://u:%FFhunter2@a").expect_err("not UTF-8");
        assert!(error.contains("server a:4222") && !error.contains("hunter2"), "{error}");
        let both = NatsConfig {
            auth: NatsAuth::Token("t".into()),
            ..NatsConfig::new("nats://u:hunter2@127.0.0.1:1")
        };
        let Err(error) = Connection::open(&both) else { panic!("connected") };
        assert!(
            matches!(error.kind(), ProviderErrorKind::InvalidInput(m) if m.contains("one way")),
            "{error}"
        );
        assert_hidden(&error, "hunter2");
    }

    #[test]
    fn the_account_is_read_from_the_user_info_answer() {
        let answer = br#"{"server":{"name":"n1","id":"NA56"},"data":{"user":"alice","account":"ORDERS","permissions":{}}}"#;
        assert_eq!(account_of(answer).as_deref(), Some("ORDERS"));
        assert_eq!(account_of(br#"{"error":{"code":503}}"#), None);
        assert_eq!(account_of(b""), None, "no responder: an empty status message");
    }

    /// What a tracing subscriber at debug level receives from async-nats while it dials.
    #[derive(Default)]
    struct Recorder(Mutex<String>);

    /// Writes every field of what it visits as `name=Debug `.
    struct Fields<'a>(&'a mut String);

    impl tracing::field::Visit for Fields<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            use std::fmt::Write as _;
            let _ = write!(self.0, "{}={value:?} ", field.name());
        }
    }

    impl tracing::Subscriber for &'static Recorder {
        fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
            metadata.target().starts_with("async_nats") && *metadata.level() <= tracing::Level::DEBUG
        }
        fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            span.record(&mut Fields(&mut self.0.lock()));
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
            values.record(&mut Fields(&mut self.0.lock()));
        }
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            event.record(&mut Fields(&mut self.0.lock()));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// A server that asks for credentials, reads the client's `CONNECT`, and refuses it.
    fn refusing_server() -> (u16, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = listener.local_addr().expect("its address").port();
        let server = std::thread::spawn(move || {
            let mut connects = Vec::new();
            for _ in 0..2 {
                let (mut socket, _) = listener.accept().expect("a client");
                socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                let info = r#"{"server_id":"fake","version":"2.10.0","proto":1,"max_payload":1048576,"headers":true,"auth_required":true}"#;
                socket.write_all(format!("INFO {info}\r\n").as_bytes()).expect("INFO");
                let mut line = String::new();
                let _ = std::io::BufReader::new(&socket).read_line(&mut line);
                let _ = socket.write_all(b"-ERR 'Authorization Violation'\r\n");
                connects.push(line);
            }
            connects
        });
        (port, server)
    }

    /// Credentials in the URL reach the server in `CONNECT` (async-nats 0.46 dropped them), and
    /// async-nats, which logs each server it dials at debug level with its URL whole, never sees
    /// them in a URL.
    #[test]
    fn url_credentials_reach_the_server_and_stay_out_of_the_clients_logs() {
        static RECORDER: std::sync::LazyLock<Recorder> = std::sync::LazyLock::new(Recorder::default);
        tracing::subscriber::set_global_default(&*RECORDER).expect("the only subscriber of these tests");
        let (port, server) = refusing_server();
        for url in
            [format!("nats://svc:hunter2@127.0.0.1:{port}"), format!("nats://hunter2@127.0.0.1:{port}")]
        {
            let error = connect_error(&url, Duration::from_secs(2));
            assert!(matches!(error.kind(), ProviderErrorKind::Backend(_)), "refused: {error}");
        }
        let connects = server.join().expect("the server");
        assert!(connects[0].contains(r#""user":"svc","pass":"hunter2""#), "{}", connects[0]);
        assert!(connects[1].contains(r#""auth_token":"hunter2""#), "{}", connects[1]);
        let logged = RECORDER.0.lock().clone();
        assert!(logged.contains(&format!("port: Some({port})")), "the servers dialled are logged: {logged}");
        assert!(!logged.contains("hunter2"), "{logged}");
    }

    #[test]
    fn reconnect_delays_grow_to_the_bound() {
        let max = Duration::from_secs(5);
        assert!(reconnect_delay(1, max) <= Duration::from_millis(125));
        assert!(reconnect_delay(1, max) >= Duration::from_millis(75));
        assert!(reconnect_delay(60, max) <= max.mul_f64(1.25));
        assert!(reconnect_delay(usize::MAX, max) >= max.mul_f64(0.75));
    }
}
