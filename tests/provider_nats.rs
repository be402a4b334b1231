//! The NATS JetStream provider against the real server: the conformance suite, then what only
//! this backend promises. Needs NATS with JetStream on 127.0.0.1:4222 (or `EVENTBROKER_NATS_URL`);
//! `scripts/ensure-service nats` starts it.

mod instance_id_support;
mod work_queue_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::provider::nats::{NatsBackend, NatsConfig, NatsProvider};
use eventbroker::testing::conformance::{Scope, TestBackend};
use eventbroker::{
    Ack, ConsumerGroup, Event, EventFilter, EventId, EventSink, EventSource, EventStatus, EventStore,
    Inbound, InboundConfig, InboundEvent, Pattern, Provider, ProviderErrorKind, ReplayFrom, StatusUpdate,
};

eventbroker::conformance_suite!(nats, eventbroker::provider::nats::NatsBackend::new);

/// How long a test waits for events that must arrive.
const ARRIVE: Duration = Duration::from_secs(15);
/// How long a test watches for events that must not arrive.
const QUIET: Duration = Duration::from_millis(500);

fn shared(events: &[Event]) -> Vec<Arc<Event>> {
    events.iter().cloned().map(Arc::new).collect()
}

fn ids(events: &[InboundEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.event.id).collect()
}

fn specific(provider: &dyn Provider, key: &str) -> u64 {
    provider.stats().expect("stats").provider_specific[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is a count"))
}

fn open(
    provider: &dyn Provider,
    instance: &str,
    group: ConsumerGroup,
    filter: &[Pattern],
) -> Arc<dyn Inbound> {
    let config = InboundConfig::new(instance, group).with_claim_idle(Duration::from_secs(1));
    let source = provider.open_inbound(&config).expect("open_inbound");
    source.set_filter(filter).expect("set_filter");
    source
}

/// Fetches and acknowledges until `n` events came or [`ARRIVE`] passed.
fn take_and_ack(source: &dyn Inbound, n: usize) -> Vec<InboundEvent> {
    let deadline = Instant::now() + ARRIVE;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} events arrived within {ARRIVE:?}", got.len());
        let batch = source.fetch(n - got.len(), Duration::from_millis(200)).expect("fetch");
        let acks: Vec<Ack> = batch.iter().map(|e| Ack::handled(e.token)).collect();
        source.ack(&acks).expect("ack");
        got.extend(batch);
    }
    got
}

fn assert_quiet(source: &dyn Inbound, what: &str) {
    let deadline = Instant::now() + QUIET;
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        let got = source.fetch(64, left).expect("fetch");
        assert!(got.is_empty(), "{what}: unexpected {:?}", ids(&got));
    }
}

/// Runs `f` on a fresh runtime with a plain client of the test's server: what the tests use to
/// look at the server without the provider.
fn with_client<T>(f: impl AsyncFnOnce(async_nats::jetstream::Context) -> T) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client =
            async_nats::connect(NatsBackend::url().trim_start_matches("nats://")).await.expect("connect");
        f(async_nats::jetstream::new(client)).await
    })
}

/// Fan-out across separate connections: each instance receives every event the other stored,
/// once, in store order, and none of its own.
#[test]
fn two_connections_fan_out_every_event_once_without_echo() {
    let backend = NatsBackend::new();
    let (pa, pb) = (backend.connect(), backend.connect());
    let scope = Scope::new();
    let (ga, gb) = (scope.instance("a"), scope.instance("b"));
    let a = open(&*pa, &scope.name("a"), ga.clone(), &[scope.all()]);
    let b = open(&*pb, &scope.name("b"), gb.clone(), &[scope.all()]);

    let from_a: Vec<Event> = (0..200).map(|i| scope.event(&format!("a.t{}", i % 5))).collect();
    let from_b: Vec<Event> = (0..200).map(|i| scope.event(&format!("b.t{}", i % 5))).collect();
    for (chunk_a, chunk_b) in from_a.chunks(50).zip(from_b.chunks(50)) {
        pa.store_batch(&shared(chunk_a), Some(&ga.key())).expect("store a");
        pb.store_batch(&shared(chunk_b), Some(&gb.key())).expect("store b");
    }
    let got_a = take_and_ack(&*a, 200);
    let got_b = take_and_ack(&*b, 200);
    assert_eq!(ids(&got_a), from_b.iter().map(|e| e.id).collect::<Vec<_>>(), "a gets b's, in order");
    assert_eq!(ids(&got_b), from_a.iter().map(|e| e.id).collect::<Vec<_>>(), "b gets a's, in order");
    assert_quiet(&*a, "a after everything");
    assert_quiet(&*b, "b after everything");
    assert_eq!(specific(&*pa, "echoes_skipped"), 200, "a's own events came back and were dropped");
}

/// Work-queue across separate connections: two members share 300 events, each to exactly one.
#[test]
fn two_connections_share_a_work_queue() {
    let backend = NatsBackend::new();
    let (publisher, p1, p2) = (backend.connect(), backend.connect(), backend.connect());
    let scope = Scope::new();
    let group = ConsumerGroup::Shared(scope.name("mailers"));
    let m1 = open(&*p1, &scope.name("m1"), group.clone(), &[scope.all()]);
    let m2 = open(&*p2, &scope.name("m2"), group, &[scope.all()]);
    let stored: Vec<Event> = (0..300).map(|_| scope.event("mail.send")).collect();
    publisher.store_batch(&shared(&stored), None).expect("store");

    let (mut got1, mut got2) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + ARRIVE;
    while got1.len() + got2.len() < stored.len() {
        assert!(Instant::now() < deadline, "only {} of 300 arrived", got1.len() + got2.len());
        for (member, got) in [(&m1, &mut got1), (&m2, &mut got2)] {
            let batch = member.fetch(16, Duration::from_millis(50)).expect("fetch");
            member.ack(&batch.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
            got.extend(ids(&batch));
        }
    }
    let all: Vec<EventId> = got1.iter().chain(&got2).copied().collect();
    assert_eq!(all.len(), 300, "no event went to both");
    assert_eq!(all.iter().collect::<HashSet<_>>(), stored.iter().map(|e| &e.id).collect::<HashSet<_>>());
    assert!(!got1.is_empty() && !got2.is_empty(), "both took a share: {} / {}", got1.len(), got2.len());
    assert_quiet(&*m1, "m1 after everything");
    assert_quiet(&*m2, "m2 after everything");
}

/// A consumer stopped mid-stream — its whole connection closed with events fetched and not
/// acknowledged — and started again under the same instance id resumes where it left off: every
/// event is handled, none lost, and only the unacknowledged ones come twice.
#[test]
fn a_consumer_stopped_mid_stream_resumes_under_its_durable_name() {
    let backend = NatsBackend::new();
    let publisher = backend.connect();
    let scope = Scope::new();
    let stored: Vec<Event> = (0..300).map(|i| scope.event(&format!("job.k{}", i % 3))).collect();

    let first_life = backend.connect();
    let before = open(&*first_life, &scope.name("w"), scope.instance("w"), &[scope.all()]);
    publisher.store_batch(&shared(&stored[..150]), None).expect("store the first half");
    let handled = take_and_ack(&*before, 100);
    let unacked = before.fetch(20, Duration::from_secs(2)).expect("fetch without acking");
    assert!(!unacked.is_empty());
    drop(before);
    first_life.close().expect("close the first life"); // the process is gone
    publisher.store_batch(&shared(&stored[150..]), None).expect("store the second half meanwhile");

    let second_life = backend.connect();
    let after = open(&*second_life, &scope.name("w"), scope.instance("w"), &[scope.all()]);
    let rest = take_and_ack(&*after, 200);
    assert_quiet(&*after, "after everything");

    let mut seen: HashMap<EventId, usize> = HashMap::new();
    for id in ids(&handled).into_iter().chain(ids(&rest)) {
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), 300, "every event handled");
    assert!(seen.values().all(|&n| n == 1), "nothing acknowledged came back");
    let again: HashSet<EventId> = rest.iter().filter(|e| e.deliveries > 1).map(|e| e.event.id).collect();
    assert_eq!(again, ids(&unacked).into_iter().collect(), "what the first life left unacked, redelivered");
    // Per-key order among the never-fetched second half holds.
    let second_half: Vec<EventId> = rest.iter().filter(|e| e.deliveries == 1).map(|e| e.event.id).collect();
    let expected: Vec<EventId> = stored.iter().map(|e| e.id).filter(|id| second_half.contains(id)).collect();
    assert_eq!(second_half, expected);
}

/// With a filter on `billing.>` only, the server never sends the other types: the consumer's own
/// delivery count is the number of billing events.
#[test]
fn a_filter_keeps_other_types_on_the_server() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let instance = scope.name("billing-only");
    let source =
        open(&*provider, &instance, ConsumerGroup::Instance(instance.clone()), &[scope.pattern("billing.>")]);
    let mut stored = Vec::new();
    for i in 0..100 {
        stored.push(scope.event(match i % 5 {
            0 => "billing.invoice.paid",
            1 => "users.created",
            2 => "orders.placed",
            3 => "billing.refund",
            _ => "audit.login",
        }));
    }
    provider.store_batch(&shared(&stored), None).expect("store");
    let got = take_and_ack(&*source, 40);
    assert!(got.iter().all(|e| e.event.event_type.contains(".billing.")));
    assert_quiet(&*source, "other types");

    let durable = format!("eb-i-{instance}");
    let stream = backend.config().stream_name.clone();
    let (delivered, pending) = with_client(async |js| {
        let stream = js.get_stream(&stream).await.expect("stream");
        let info = stream.consumer_info(&durable).await.expect("consumer info");
        (info.delivered.consumer_sequence, info.num_pending)
    });
    assert_eq!(delivered, 40, "the server sent the 40 billing events and nothing else");
    assert_eq!(pending, 0);
    assert_eq!(specific(&*provider, "filtered_after_fetch"), 0);
}

/// A source of fan-out group `a` filtered on `billing.>`, handed and acknowledging one event,
/// whose consumer is then deleted under it; the backend is kept for its stream's lifetime.
fn consumer_deleted_after_one_event()
-> (NatsBackend, Arc<dyn Provider>, Scope, ConsumerGroup, Arc<dyn Inbound>) {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let group = scope.instance("a");
    let source = open(&*provider, &scope.name("a"), group.clone(), &[scope.pattern("billing.>")]);
    let before = scope.event("billing.paid");
    provider.store_batch(&shared(std::slice::from_ref(&before)), None).expect("store");
    assert_eq!(ids(&take_and_ack(&*source, 1)), vec![before.id]);
    assert!(provider.delete_group(&group).expect("delete_group"), "the consumer existed");
    (backend, provider, scope, group, source)
}

/// A live instance's consumer removed under it (`delete_group` run for a group still in use, or an
/// operator removing it) is made again by its next fetch, after the last message the source saw:
/// what was stored since arrives, filtered as before, and nothing acknowledged comes back. The
/// consumer made again takes later filters, and a restart with another claim idle time keeps it.
#[test]
fn a_consumer_deleted_under_a_live_source_is_made_again_where_it_stood() {
    let (_backend, provider, scope, group, source) = consumer_deleted_after_one_event();
    let since = [scope.event("billing.refund"), scope.event("users.created"), scope.event("billing.paid")];
    provider.store_batch(&shared(&since), None).expect("store while the consumer is gone");
    let got = take_and_ack(&*source, 2);
    assert_eq!(ids(&got), vec![since[0].id, since[2].id], "what was stored since, filtered");
    assert!(got.iter().all(|e| e.deliveries == 1), "{got:?}");
    assert_quiet(&*source, "after the consumer was made again");

    source.set_filter(&[scope.all()]).expect("set_filter on the consumer made again");
    let later = scope.event("users.deleted");
    provider.store_batch(&shared(std::slice::from_ref(&later)), None).expect("store");
    assert_eq!(ids(&take_and_ack(&*source, 1)), vec![later.id]);
    source.close().expect("close");

    let config = InboundConfig::new(scope.name("a"), group).with_claim_idle(Duration::from_secs(2));
    let restarted = provider.open_inbound(&config).expect("reopen with another claim idle time");
    restarted.set_filter(&[scope.all()]).expect("set_filter");
    let last = scope.event("orders.placed");
    provider.store_batch(&shared(std::slice::from_ref(&last)), None).expect("store");
    assert_eq!(ids(&take_and_ack(&*restarted, 1)), vec![last.id]);
    assert_quiet(&*restarted, "after the restart");
}

/// Fetches and acknowledges until `last` arrives, or [`ARRIVE`] passed; everything that came.
fn take_until(source: &dyn Inbound, last: EventId) -> Vec<EventId> {
    let deadline = Instant::now() + ARRIVE;
    let mut got = Vec::new();
    while !got.contains(&last) {
        assert!(Instant::now() < deadline, "{last} did not arrive within {ARRIVE:?}; came {got:?}");
        let batch = source.fetch(16, Duration::from_millis(200)).expect("fetch");
        source.ack(&batch.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
        got.extend(ids(&batch));
    }
    got
}

/// A filter the server refuses for a while (here: the stream's subjects moved elsewhere, so a
/// new filter is no subset of them) is not left to the filter before it: the consumer goes on
/// without one, the patterns checked after fetching, so neither the event stored before the
/// change nor those stored after it are passed over; later the consumer gets its filter. Before,
/// the refused write left the old filter in place, the fetches went on with it, and every `users`
/// event was passed over for good.
#[test]
fn a_filter_the_server_refuses_for_a_while_passes_over_no_wanted_event() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let instance = scope.name("a");
    let source =
        open(&*provider, &instance, ConsumerGroup::Instance(instance.clone()), &[scope.pattern("billing.>")]);
    let (stream, prefix) = (backend.config().stream_name.clone(), backend.config().subject_prefix.clone());
    let durable = format!("eb-i-{instance}");
    let set_subjects = |subject: String| {
        let stream = stream.clone();
        with_client(async move |js| {
            let mut config = js.get_stream(&stream).await.expect("stream").cached_info().config.clone();
            config.subjects = vec![subject];
            js.update_stream(config).await.expect("update the stream's subjects");
        });
    };
    let filter_on_server = || {
        let (stream, durable) = (stream.clone(), durable.clone());
        with_client(async move |js| {
            let info =
                js.get_stream(&stream).await.expect("stream").consumer_info(&durable).await.expect("info");
            let mut filters = info.config.filter_subjects.clone();
            filters
                .extend((!info.config.filter_subject.is_empty()).then(|| info.config.filter_subject.clone()));
            filters
        })
    };

    let early = scope.event("users.created");
    provider.store_batch(&shared(std::slice::from_ref(&early)), None).expect("store under the old filter");
    set_subjects(format!("{prefix}_elsewhere"));
    let pushed = source.set_filter(&[scope.pattern("billing.>"), scope.pattern("users.>")]);
    let while_refused = filter_on_server();
    set_subjects(format!("{prefix}.>"));

    let after = ["billing.paid", "users.deleted", "audit.login", "billing.refund"].map(|t| scope.event(t));
    provider.store_batch(&shared(&after), None).expect("store");
    let got = take_until(&*source, after[3].id);
    assert_eq!(got, vec![early.id, after[0].id, after[1].id, after[3].id], "set_filter: {pushed:?}");
    assert_quiet(&*source, "audit");
    assert_eq!(while_refused, Vec::<String>::new(), "refused, the filter gave way to none");
    let deadline = Instant::now() + ARRIVE;
    while filter_on_server().is_empty() {
        assert!(Instant::now() < deadline, "the filter was not written again");
        source.fetch(1, Duration::from_millis(100)).expect("fetch");
    }
}

/// A consumer deleted under a live source and then given a new filter before any fetch is made
/// again by `set_filter` where it stood, not at the stream's end: the events stored while it was
/// gone, before and after the new filter, all arrive. The filter's write made the missing consumer
/// with deliver policy `new`, passing over everything stored since the deletion.
#[test]
fn a_consumer_deleted_and_then_filtered_is_made_again_where_it_stood() {
    let (_backend, provider, scope, _group, source) = consumer_deleted_after_one_event();
    let gone = [scope.event("billing.refund"), scope.event("users.created")];
    provider.store_batch(&shared(&gone), None).expect("store while the consumer is gone");
    source.set_filter(&[scope.pattern("billing.>"), scope.pattern("users.>")]).expect("set_filter");
    let after = scope.event("users.deleted");
    provider.store_batch(&shared(std::slice::from_ref(&after)), None).expect("store after the filter");
    let got = take_and_ack(&*source, 3);
    assert_eq!(ids(&got), vec![gone[0].id, gone[1].id, after.id], "nothing stored since was passed over");
    assert!(got.iter().all(|e| e.deliveries == 1), "{got:?}");
    assert_quiet(&*source, "after the consumer was made again");
}

/// A claim idle time or a nak delay longer than the server's durations hold (`i64::MAX`
/// nanoseconds, about 292 years; `Duration::MAX` for "never") is taken as the longest they hold:
/// the source opens and delivers, and the event given back stays back. The server refused such a
/// claim idle time as invalid JSON, failing `open_inbound`, and took such a nak for one without a
/// delay.
#[test]
fn durations_past_the_servers_range_are_taken_as_its_longest() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let config = InboundConfig::new(scope.name("a"), scope.instance("a")).with_claim_idle(Duration::MAX);
    let patient =
        provider.open_inbound(&config).expect("open_inbound with a claim idle time of Duration::MAX");
    patient.set_filter(&[scope.pattern("patient.>")]).expect("set_filter");
    let source = open(&*provider, &scope.name("b"), scope.instance("b"), &[scope.pattern("naked.>")]);
    let (waiting, naked) = (scope.event("patient.job"), scope.event("naked.job"));
    provider.store_batch(&shared(&[waiting.clone(), naked.clone()]), None).expect("store");
    assert_eq!(ids(&take_and_ack(&*patient, 1)), vec![waiting.id]);

    let deadline = Instant::now() + ARRIVE;
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(Instant::now() < deadline, "the event did not arrive");
        got = source.fetch(1, Duration::from_millis(200)).expect("fetch");
    }
    assert_eq!(ids(&got), vec![naked.id]);
    source.nak(&[got[0].token], Duration::MAX).expect("nak");
    // Past the source's claim idle time (1 s) too.
    let watch = Instant::now() + Duration::from_millis(1500);
    while let Some(left) = watch.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        let back = source.fetch(4, left).expect("fetch");
        assert!(back.is_empty(), "given back for ever, it came again: {back:?}");
    }
}

/// A fetch for as many events as there are (`usize::MAX`) hands out what is there. The pull
/// request carried the number as it was, which the server refused (a batch is a signed 64-bit
/// number), and the refusal read as "nothing now": the source handed out nothing, ever.
#[test]
fn a_fetch_for_as_many_as_there_are_hands_them_out() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let source = open(&*provider, &scope.name("a"), scope.instance("a"), &[scope.all()]);
    let stored: Vec<Event> = (0..3).map(|_| scope.event("job")).collect();
    provider.store_batch(&shared(&stored), None).expect("store");
    let deadline = Instant::now() + ARRIVE;
    let mut got = Vec::new();
    while got.len() < stored.len() {
        assert!(Instant::now() < deadline, "{} of {} events arrived", got.len(), stored.len());
        got.extend(source.fetch(usize::MAX, Duration::from_millis(200)).expect("fetch"));
    }
    assert_eq!(ids(&got), stored.iter().map(|e| e.id).collect::<Vec<_>>());
}

/// A group name ending in whitespace (`Distribution::WorkQueue("mailers ")`) cannot be told by
/// the origin header its events carry, which is read back trimmed: such a group is refused, and
/// so is storing with such an origin. Before, the group received its own events (no echo broke),
/// and the group named without the whitespace took them for its own and never received them.
#[test]
fn a_group_name_ending_in_whitespace_keeps_no_echo() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let trailing = ConsumerGroup::Shared(format!("{} ", scope.name("q")));
    let config =
        InboundConfig::new(scope.name("m1"), trailing.clone()).with_claim_idle(Duration::from_secs(1));
    match provider.open_inbound(&config) {
        Err(error) => assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)), "{error}"),
        Ok(source) => {
            source.set_filter(&[scope.all()]).expect("set_filter");
            let own = scope.event("own");
            provider.store_batch(&shared(&[own]), Some(&trailing.key())).expect("store");
            assert_quiet(&*source, "the group's own event");
        }
    }

    let plain = ConsumerGroup::Shared(scope.name("q"));
    let source = open(&*provider, &scope.name("m2"), plain, &[scope.all()]);
    let other = scope.event("other");
    match provider.store_batch(&shared(std::slice::from_ref(&other)), Some(&trailing.key())) {
        Err(error) => assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)), "{error}"),
        Ok(()) => assert_eq!(ids(&take_and_ack(&*source, 1)), vec![other.id], "another group's event"),
    }
    assert_eq!(specific(&*provider, "echoes_skipped"), 0);
}

/// Two patterns: a 2.10+ server filters each exactly; a 2.9 server takes one covering subject, and
/// what it lets through is dropped after fetching. Delivery is exact either way.
#[test]
fn several_patterns_are_filtered_exactly_whatever_the_server_version() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let source = open(
        &*provider,
        &scope.name("a"),
        scope.instance("a"),
        &[scope.pattern("billing.>"), scope.pattern("audit.login")],
    );
    let stored: Vec<Event> = ["billing.paid", "users.created", "audit.login", "audit.logout", "billing.x.y"]
        .map(|t| scope.event(t))
        .to_vec();
    provider.store_batch(&shared(&stored), None).expect("store");
    let got = take_and_ack(&*source, 3);
    assert_eq!(ids(&got), vec![stored[0].id, stored[2].id, stored[4].id]);
    assert_quiet(&*source, "unwanted types");
    let multi = provider.stats().expect("stats").provider_specific["multi_filter"].as_bool().expect("a flag");
    let dropped = specific(&*provider, "filtered_after_fetch");
    if multi {
        assert_eq!(dropped, 0, "one filter per pattern");
    } else {
        assert_eq!(dropped, 2, "`*.>` under the scope let users.created and audit.logout through");
    }
}

/// A second store of an id after the server's duplicate window has passed still keeps its
/// sequence, replaces the event, and is not delivered again.
#[test]
fn a_store_after_the_duplicate_window_keeps_its_sequence_and_is_not_delivered_again() {
    let backend = NatsBackend::with(|config| config.duplicate_window = Duration::from_secs(1));
    let provider = backend.connect();
    let scope = Scope::new();
    let source = open(&*provider, &scope.name("a"), scope.instance("a"), &[scope.all()]);
    let original = scope.event("orders.create");
    provider.store_batch(&[Arc::new(original.clone())], None).expect("store");
    assert_eq!(ids(&take_and_ack(&*source, 1)), vec![original.id]);
    let seq = provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events[0].seq;

    // The window is a time the server measures: let it pass.
    std::thread::sleep(Duration::from_millis(1500));
    let mut replacement = original.clone();
    replacement.status = EventStatus::Completed;
    replacement.set_payload_json(r#"{"v":2}"#).expect("valid JSON");
    provider.store_batch(&[Arc::new(replacement.clone())], None).expect("store again");

    assert_quiet(&*source, "a second store");
    let replayed = provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events;
    assert_eq!(replayed.len(), 1);
    assert_eq!((replayed[0].seq, &replayed[0].event), (seq, &replacement));
    assert_eq!(provider.get(original.id).expect("get"), Some(replacement));
    assert_eq!(specific(&*provider, "stream_messages"), 1, "nothing was published the second time");
    assert_eq!(specific(&*provider, "replaced"), 1);
}

/// An event deleted and stored again is stored anew: a new sequence, delivered again.
#[test]
fn an_event_deleted_and_stored_again_is_a_new_store() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let source = open(&*provider, &scope.name("a"), scope.instance("a"), &[scope.all()]);
    let event = scope.event("orders.create");
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
    let first = take_and_ack(&*source, 1);
    let seq = provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events[0].seq;
    assert!(provider.delete(event.id).expect("delete"));
    assert_eq!(provider.get(event.id).expect("get"), None);

    provider.store_batch(&[Arc::new(event.clone())], None).expect("store again, inside the duplicate window");
    assert_eq!(provider.get(event.id).expect("get"), Some(event.clone()));
    let replayed = provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events;
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0].seq > seq, "a new message");
    let second = take_and_ack(&*source, 1);
    assert_eq!((ids(&first), ids(&second)), (vec![event.id], vec![event.id]));
    assert_eq!(scope.list(&*provider), vec![event]);
}

/// Status updates and deletes never add messages to the event stream (the seed published them
/// there, where they showed up as events).
#[test]
fn statuses_and_deletes_never_write_to_the_event_stream() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let events: Vec<Event> = (0..10).map(|_| scope.event("tick")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    for status in [EventStatus::Processing, EventStatus::Completed, EventStatus::Failed] {
        let updates: Vec<StatusUpdate> = events.iter().map(|e| StatusUpdate::new(e.id, status)).collect();
        provider.update_status_batch(&updates).expect("update");
    }
    assert!(provider.delete(events[0].id).expect("delete"));
    assert_eq!(specific(&*provider, "stream_last_seq"), 10, "ten events, nothing else, ever");
    assert_eq!(specific(&*provider, "stream_messages"), 9);
    let failed = provider.list(&scope.filter().with_status(EventStatus::Failed)).expect("list");
    assert_eq!(failed.len(), 9);
    assert_eq!(provider.stats().expect("stats").failed_events, 9);
}

/// Types with bytes NATS does not take in a subject token are escaped, and patterns filter them at
/// the server all the same.
#[test]
fn types_outside_the_subject_alphabet_are_escaped_and_filtered_at_the_server() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let source = open(&*provider, &scope.name("a"), scope.instance("a"), &[scope.pattern("café.>")]);
    let stored: Vec<Event> = ["café.paid", "tea.paid", "café.crème.brûlée"].map(|t| scope.event(t)).to_vec();
    provider.store_batch(&shared(&stored), None).expect("store");
    assert_eq!(ids(&take_and_ack(&*source, 2)), vec![stored[0].id, stored[2].id]);
    assert_quiet(&*source, "tea");
    let subject = format!("{}.{}", backend.config().subject_prefix, scope.ty("caf%C3%A9.paid"));
    let stream = backend.config().stream_name.clone();
    let found = with_client(async |js| {
        let stream = js.get_stream(&stream).await.expect("stream");
        stream.get_last_raw_message_by_subject(&subject).await.map(|m| m.sequence)
    });
    assert_eq!(found.expect("the escaped subject holds the event"), 1);
    assert_eq!(specific(&*provider, "filtered_after_fetch"), 0, "tea was never sent");
}

/// A message published by another client — here bash speaking the NATS protocol over a socket —
/// with the seed's JSON on `<prefix>.<type>` is delivered, and listed.
#[test]
fn an_event_published_by_another_client_with_the_seeds_json_is_delivered() {
    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let source = open(&*provider, &scope.name("a"), scope.instance("a"), &[scope.all()]);
    let id = "0b4e7f5c-2d7a-4c1e-9b7f-3f1f2d9a8e61"; // a v4 id, as the Go seed makes
    let event_type = scope.ty("public.users.create");
    let json = format!(
        r#"{{"id":"{id}","source":"database","type":"{event_type}","status":"pending","retry_count":0,"payload":{{"name":"John Doe","id":123}},"user_id":123,"session_id":"session-456","instance_id":"go-1","schema":"public","entity":"users","operation":"create","created_at":"2024-01-15T10:30:00.123456789Z","processed_at":null,"completed_at":null,"metadata":{{"trace":"abc"}}}}"#
    );
    let subject = format!("{}.{event_type}", backend.config().subject_prefix);
    publish_with_bash(&subject, &json);

    let got = take_and_ack(&*source, 1);
    let event = &got[0].event;
    assert_eq!(event.id.to_string(), id);
    assert_eq!(
        (event.event_type.as_str(), event.user_id, event.instance_id.as_str()),
        (event_type.as_str(), 123, "go-1")
    );
    assert_eq!(event.payload_json(), Some(r#"{"name":"John Doe","id":123}"#), "payload text as sent");
    let listed = provider.list(&EventFilter::new().with_event_type(scope.all())).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, event.id);
}

/// Publishes `payload` on `subject` with bash and the NATS text protocol: `CONNECT`, `PUB`, then a
/// `PING` whose `PONG` says the server processed the publish.
fn publish_with_bash(subject: &str, payload: &str) {
    let address = NatsBackend::url().trim_start_matches("nats://").to_owned();
    let (host, port) = address.split_once(':').expect("host:port");
    let script = r#"
        set -eu
        exec 3<>"/dev/tcp/$HOST/$PORT"
        read -r -t 5 info <&3
        len=$(printf '%s' "$PAYLOAD" | LC_ALL=C wc -c)
        printf 'CONNECT {"verbose":false,"pedantic":false,"lang":"bash","version":"1"}\r\nPUB %s %d\r\n%s\r\nPING\r\n' \
            "$SUBJECT" "$len" "$PAYLOAD" >&3
        while read -r -t 5 line <&3; do
            case "$line" in PONG*) exit 0 ;; -ERR*) echo "$line" >&2; exit 1 ;; esac
        done
        exit 1
    "#;
    let status = std::process::Command::new("bash")
        .args(["-c", script])
        .env("HOST", host)
        .env("PORT", port)
        .env("SUBJECT", subject)
        .env("PAYLOAD", payload)
        .status()
        .expect("bash runs");
    assert!(status.success(), "bash could not publish: {status}");
}

/// Settings and types NATS would refuse or misread are refused before anything is written.
#[test]
fn invalid_settings_and_types_are_refused() {
    let bad = NatsConfig { stream_name: "my.events".into(), ..NatsConfig::new(NatsBackend::url()) };
    let error = NatsProvider::connect(bad).expect_err("a dot in a stream name");
    assert!(
        matches!(error.kind(), ProviderErrorKind::InvalidInput(m) if m.contains("nats.stream_name")),
        "{error}"
    );

    let backend = NatsBackend::new();
    let provider = backend.connect();
    let scope = Scope::new();
    let good = scope.event("ok");
    let mut bad = scope.event("ok");
    bad.event_type = format!("{}..x", scope.ty("a")).into();
    let error = provider.store_batch(&shared(&[good.clone(), bad]), None).expect_err("an empty segment");
    assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)), "{error}");
    assert_eq!(provider.get(good.id).expect("get"), None, "nothing of the batch was stored");
}

/// A server that is not there fails `connect` as `Unavailable` within its timeout.
#[test]
fn an_unreachable_server_fails_as_unavailable_within_the_timeout() {
    let config =
        NatsConfig { connect_timeout: Duration::from_secs(1), ..NatsConfig::new("nats://127.0.0.1:1") };
    let started = Instant::now();
    let error = NatsProvider::connect(config).expect_err("nothing listens on port 1");
    assert!(error.is_transient(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
}

/// A work-queue member that unsubscribes one of its patterns gives what it fetched for it back to
/// the group: the other member gets every one (see `work_queue_support`).
#[test]
fn a_partial_unsubscribe_gives_back_to_the_group() {
    let backend = NatsBackend::new();
    let connect = || -> Arc<dyn Provider> { Arc::new(backend.provider()) };
    work_queue_support::a_partial_unsubscribe_gives_back_to_the_group(&connect, "partial");
}

/// An event larger than the server's `max_payload` (1 MiB by default) cannot be stored, and is
/// no transient failure: storing it fails at once as invalid input, and it does not hold up the
/// publishing broker's writer, whose later events still reach the other instance.
#[test]
fn an_event_over_the_servers_max_payload_is_refused_without_holding_up_the_writer() {
    let backend = NatsBackend::new();
    let provider = backend.provider();
    let big = Event::new(EventSource::System, "big.one").with_payload(&"x".repeat(2 << 20)).expect("JSON");
    let small = Event::new(EventSource::System, "big.small");
    let started = Instant::now();
    let error = provider.store_batch(&shared(&[big.clone(), small.clone()]), None).expect_err("too big");
    assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)), "{error}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
    assert!(provider.get(small.id).expect("get").is_some(), "the rest of the batch is stored");

    let broker = |id: &str| {
        eventbroker::Broker::builder()
            .provider(Arc::new(backend.provider()))
            .instance_id(id)
            .build()
            .expect("broker")
    };
    let (publisher, receiver) = (broker("big-publisher"), broker("big-receiver"));
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = parking_lot::Mutex::new(tx);
    receiver
        .subscribe_infallible("big.>", move |event: &Event| {
            let _ = tx.lock().send(event.id);
        })
        .expect("subscribe");
    std::thread::sleep(Duration::from_millis(500)); // The receiver's first fetch.
    let later = Event::new(EventSource::System, "big.later");
    publisher.publish_async(big).expect("publish");
    publisher.publish_async(later.clone()).expect("publish");
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(later.id), "the later event arrives");
    for broker in [publisher, receiver] {
        let _ = broker.shutdown(Duration::from_secs(5));
    }
}

/// An instance id with a line break (valid JSON, from `with_instance_id` or a foreign event) does
/// not end the message's headers early, which left the group's delivery stuck on it, nor add a
/// header of its own, such as a forged origin that made the receiver drop the event as its echo.
#[test]
fn an_instance_id_with_line_breaks_is_delivered_as_it_is() {
    let backend = NatsBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let source = open(&provider, "receiver", scope.instance("receiver"), &[scope.all()]);
    let odd = scope.event("odd").with_instance_id("legacy\nsecond-line");
    let forged = scope.event("forged").with_instance_id("legacy\r\nEventbroker-Origin: instance:receiver");
    let normal = scope.event("normal");
    provider
        .store_batch(&shared(&[odd.clone(), forged.clone(), normal.clone()]), Some("instance:p"))
        .expect("store");
    let got = take_and_ack(&*source, 3);
    let mut got_ids = ids(&got);
    got_ids.sort();
    let mut want = vec![odd.id, forged.id, normal.id];
    want.sort();
    assert_eq!(got_ids, want);
    let odd_back = got.iter().find(|e| e.event.id == odd.id).expect("odd");
    assert_eq!(odd_back.event.instance_id, "legacy\nsecond-line");
    assert_eq!(specific(&provider, "echoes_skipped"), 0);
}

/// Events waiting in a work-queue member's shard behind slow handlers keep their claims: no other
/// member takes them, and none is handled twice (see `work_queue_support`).
#[test]
fn events_waiting_in_a_shard_keep_their_claims() {
    let backend = NatsBackend::new();
    let connect = || -> Arc<dyn Provider> { Arc::new(backend.provider()) };
    work_queue_support::events_waiting_in_a_shard_keep_their_claims(&connect, "waiting");
}

/// A message another client published for an event id before the provider stored that id (no
/// `Nats-Msg-Id`, so the server kept both) leaves the event listed once, as the provider stored
/// it: the first message of the id is the one the record does not name.
#[test]
fn an_id_with_an_earlier_foreign_message_is_listed_once() {
    let backend = NatsBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let event = scope.event("orders.create").with_user_id(7);
    let subject = format!("{}.{}", backend.config().subject_prefix, event.event_type);
    let json = event.to_json();
    with_client(async |js| {
        js.publish(subject, json.into()).await.expect("publish").await.expect("stored");
    });
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");

    assert_eq!(provider.get(event.id).expect("get"), Some(event.clone()));
    assert_eq!(scope.list(&provider), vec![event.clone()], "listed once");
    let replayed = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events;
    assert_eq!(replayed.iter().map(|s| s.event.id).collect::<Vec<_>>(), vec![event.id]);
}

/// Events whose messages the stream discarded to stay within `max_bytes` are gone from every
/// query, stats included, and an id stored again after that is stored anew.
#[test]
fn events_the_stream_discarded_for_max_bytes_are_gone_from_every_query() {
    let backend = NatsBackend::with(|config| config.max_bytes = Some(4096));
    let provider = backend.provider();
    let scope = Scope::new();
    let events: Vec<Event> =
        (0..20).map(|_| scope.event("bulk").with_payload(&"x".repeat(400)).expect("JSON")).collect();
    for event in &events {
        provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
    }
    let kept = scope.list(&provider);
    assert!(!kept.is_empty() && kept.len() < events.len(), "{} of {} kept", kept.len(), events.len());
    assert_eq!(provider.get(events[0].id).expect("get"), None, "the oldest went");
    let stats = provider.stats().expect("stats");
    assert_eq!(stats.total_events, kept.len() as u64, "stats count what is stored");
    assert_eq!(stats.pending_events, kept.len() as u64);

    // Stored again, the first event is stored anew (its record named a discarded message).
    let mut again = events[0].clone();
    again.status = EventStatus::Completed;
    provider.store_batch(&[Arc::new(again.clone())], None).expect("store again");
    assert_eq!(provider.get(again.id).expect("get"), Some(again.clone()));
    assert!(scope.list(&provider).contains(&again));
}

/// Two brokers of this process built from one configuration (a connection each) under one
/// instance id would share one durable consumer on the stream: the second is refused, naming the
/// stream (see `instance_id_support`); another stream on the server is another namespace.
#[test]
fn one_instance_id_receives_from_a_nats_stream_once_per_process() {
    let (backend, other) = (NatsBackend::new(), NatsBackend::new());
    let config_of = |backend: &NatsBackend| {
        let mut config = eventbroker::config::Config::default();
        config.provider = eventbroker::config::ProviderKind::Nats;
        config.nats.url = Some(NatsBackend::url());
        config.nats.stream_name = Some(backend.config().stream_name.clone());
        config.nats.subject_prefix = Some(backend.config().subject_prefix.clone());
        config
    };
    instance_id_support::one_instance_id_receives_from_a_namespace_once(
        &config_of(&backend),
        &backend.config().stream_name,
        &config_of(&other),
    );
}

/// A provider's group namespace is its servers as the URL names them (defaults filled in, in any
/// order) and the stream.
#[test]
fn the_group_namespace_names_the_servers_and_stream() {
    let backend = NatsBackend::new();
    let unique = backend.config().stream_name.clone();
    let namespace = |url: &str| {
        let config = NatsConfig { url: url.into(), ..backend.config().clone() };
        NatsProvider::connect(config).expect("connect").group_namespace()
    };
    let one = namespace("nats://127.0.0.1:4222");
    assert_eq!(one, namespace("127.0.0.1"));
    assert!(one.to_string().ends_with(&format!(" 127.0.0.1:4222, stream {unique}")), "{one}");
    let two = namespace("nats://127.0.0.1:4222, nats://localhost:4222");
    assert_eq!(two, namespace("localhost,127.0.0.1:4222"), "one cluster, named in any order");
    assert_ne!(one, two, "addresses are compared as written, never resolved");
}
