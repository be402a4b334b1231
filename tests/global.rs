//! The process-wide default broker. One test: the default broker is process state, and this
//! binary's only test owns it from before `init` to after `shutdown`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbroker::config::Config;
use eventbroker::{
    DrainError, Event, EventSource, InitError, NotInitialized, PublishError, SubscribeError, SyncPublishError,
};

const WAIT: Duration = Duration::from_secs(10);

fn user_created() -> Event {
    Event::for_entity(EventSource::Database, "public", "users", "create")
}

#[test]
fn the_default_broker_from_before_init_to_after_shutdown() {
    // Before init: every entry point says so, and hands the event back.
    assert!(matches!(eventbroker::global(), Err(NotInitialized)));
    match eventbroker::publish(user_created()) {
        Err(SyncPublishError::Rejected(PublishError::NotInitialized(event))) => {
            assert_eq!(event.event_type, "public.users.create");
        }
        other => panic!("expected NotInitialized, got {other:?}"),
    }
    assert!(matches!(eventbroker::publish_async(user_created()), Err(PublishError::NotInitialized(_))));
    assert!(matches!(eventbroker::publish_sync(user_created()), Err(SyncPublishError::Rejected(_))));
    assert!(matches!(eventbroker::subscribe_infallible("*", |_| {}), Err(SubscribeError::NotInitialized)));
    assert!(matches!(eventbroker::drain(WAIT), Err(DrainError::NotInitialized)));
    assert!(matches!(eventbroker::shutdown(WAIT), Err(NotInitialized)));

    // A failed init leaves nothing behind.
    let mut disabled = Config::default();
    disabled.enabled = false;
    assert!(matches!(eventbroker::init(&disabled), Err(InitError::Build(eventbroker::BuildError::Disabled))));
    assert!(eventbroker::global().is_err());

    // Init, then the free functions reach the default broker.
    let mut config = Config::default();
    config.worker_count = 2;
    config.instance_id = "global-1".into();
    let broker = eventbroker::init(&config).unwrap();
    assert_eq!(eventbroker::global().unwrap().instance_id(), "global-1");
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    eventbroker::subscribe("public.users.*", move |event: &Event| {
        assert_eq!(event.instance_id, "global-1");
        counter.fetch_add(1, Ordering::Relaxed);
        Ok::<(), std::io::Error>(())
    })
    .unwrap();
    eventbroker::publish(user_created()).unwrap();
    eventbroker::publish_async(user_created()).unwrap();
    eventbroker::publish_sync(user_created()).unwrap();
    eventbroker::drain(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), 3);
    assert_eq!(broker.stats().processed, 3);

    // A second init is refused, naming the broker already there.
    match eventbroker::init(&config) {
        Err(InitError::AlreadyInitialized { instance_id }) => assert_eq!(instance_id, "global-1"),
        other => panic!("expected AlreadyInitialized, got {other:?}"),
    }
    assert!(matches!(
        eventbroker::init_builder(eventbroker::Broker::builder()),
        Err(InitError::AlreadyInitialized { .. })
    ));

    // Shutdown drains; the broker stays the default, closed.
    let report = eventbroker::shutdown(WAIT).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(matches!(
        eventbroker::publish(user_created()),
        Err(SyncPublishError::Rejected(PublishError::Closed(_)))
    ));
    assert!(eventbroker::shutdown(WAIT).unwrap().already_shut_down);
}
