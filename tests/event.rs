//! The event model: wire compatibility with the Go seed, round trips, and the two decoders.

use eventbroker::{DecodeError, Event, EventId, EventSource, EventStatus, PayloadError, event_type};
use jiff::Timestamp;
use proptest::prelude::*;
use serde_json::{Value, json};

/// An event exactly as the Go broker's `json.Marshal` writes it: RFC 3339 times with nanoseconds
/// and a local offset, `error` omitted when empty, a v4 id, raw payload, nil pointers as null.
const GO_EVENT: &str = r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"database","type":"public.users.update","status":"completed","retry_count":2,"payload":{"id":123,"name":"John Doe","tags":["a","b"]},"user_id":123,"session_id":"session-456","instance_id":"api-1","schema":"public","entity":"users","operation":"update","created_at":"2025-01-27T10:15:30.123456789+01:00","processed_at":"2025-01-27T10:15:30.2+01:00","completed_at":"2025-01-27T10:15:31Z","metadata":{"ip":"10.0.0.1","attempt":{"n":1}}}"#;

/// The same with Go's zero values: nil map, nil payload, nil time pointers, and an error.
const GO_EVENT_NULLS: &str = r#"{"id":"0b7a3c52-1111-4c2a-8d5e-000000000001","source":"websocket","type":"chat.message","status":"failed","retry_count":0,"error":"handler timed out","payload":null,"user_id":0,"session_id":"","instance_id":"","schema":"","entity":"","operation":"","created_at":"2025-01-27T10:15:30Z","processed_at":null,"completed_at":null,"metadata":null}"#;

#[test]
fn decodes_an_event_written_by_the_go_seed() {
    let event = Event::from_json(GO_EVENT).unwrap();
    assert_eq!(event.id.to_string(), "3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b");
    assert_eq!(event.source, EventSource::Database);
    assert_eq!(event.event_type, "public.users.update");
    assert_eq!(event.status, EventStatus::Completed);
    assert_eq!(event.retry_count, 2);
    assert_eq!(event.error, "");
    assert_eq!(event.payload_json(), Some(r#"{"id":123,"name":"John Doe","tags":["a","b"]}"#));
    assert_eq!(
        (event.user_id, event.session_id.as_str(), event.instance_id.as_str()),
        (123, "session-456", "api-1")
    );
    assert_eq!(
        (event.schema.as_str(), event.entity.as_str(), event.operation.as_str()),
        ("public", "users", "update")
    );
    assert_eq!(event.created_at, "2025-01-27T09:15:30.123456789Z".parse::<Timestamp>().unwrap());
    assert_eq!(event.processed_at, Some("2025-01-27T09:15:30.2Z".parse().unwrap()));
    assert_eq!(event.completed_at, Some("2025-01-27T10:15:31Z".parse().unwrap()));
    assert_eq!(event.metadata["attempt"], json!({"n": 1}));
    assert_eq!(event.partition_key, None);

    let nulls = Event::from_json(GO_EVENT_NULLS).unwrap();
    assert_eq!(nulls.status, EventStatus::Failed);
    assert_eq!(nulls.error, "handler timed out");
    assert!(nulls.payload.is_none());
    assert!(matches!(nulls.payload::<Value>(), Err(PayloadError::Empty)));
    assert!(nulls.metadata.is_empty());
    assert_eq!((nulls.processed_at, nulls.completed_at), (None, None));
}

#[test]
fn simd_decoder_agrees_on_the_go_events() {
    for doc in [GO_EVENT, GO_EVENT_NULLS] {
        let mut bytes = doc.as_bytes().to_vec();
        assert_eq!(Event::from_json_simd(&mut bytes).unwrap(), Event::from_json(doc).unwrap());
    }
}

/// What the Go decoder needs from us: every field of its struct under its JSON name with a JSON
/// type it accepts, times in RFC 3339, `error` only when set.
#[test]
fn our_json_has_the_seed_layout() {
    let event = Event::for_entity(EventSource::Database, "public", "users", "create")
        .with_user_id(7)
        .with_session_id("s-1")
        .with_instance_id("i-1")
        .with_metadata("trace", "abc")
        .with_payload(&json!({"id": 7}))
        .unwrap();
    let value: Value = serde_json::from_str(&event.to_json()).unwrap();
    let object = value.as_object().unwrap();
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut expected = vec![
        "id",
        "source",
        "type",
        "status",
        "retry_count",
        "payload",
        "user_id",
        "session_id",
        "instance_id",
        "schema",
        "entity",
        "operation",
        "created_at",
        "processed_at",
        "completed_at",
        "metadata",
    ];
    expected.sort_unstable();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    assert_eq!(keys_sorted, expected, "error is omitted when empty, partition_key when unset");
    assert_eq!(object["source"], "database");
    assert_eq!(object["status"], "pending");
    assert_eq!(object["type"], "public.users.create");
    assert_eq!(object["payload"], json!({"id": 7}));
    assert_eq!(object["user_id"], 7);
    assert_eq!(object["processed_at"], Value::Null);
    let created = object["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.contains('T'), "RFC 3339 UTC: {created}");
    assert!(event.id.as_uuid().get_version_num() == 7);

    let failed = Event { error: "boom".into(), partition_key: Some("k".into()), ..event };
    let value: Value = serde_json::from_str(&failed.to_json()).unwrap();
    assert_eq!(value["error"], "boom");
    assert_eq!(value["partition_key"], "k");
}

#[test]
fn payload_text_is_kept_byte_for_byte() {
    let text = "{ \"b\" : 1.50, \"a\":\"\\u00e9\\n\",  \"big\": 123456789012345678901234567890 }";
    let event = Event::new(EventSource::Internal, "x.y").with_metadata("k", 1);
    let mut event = event;
    event.set_payload_json(text).expect("valid JSON");
    assert_eq!(event.payload_json(), Some(text));
    let back = Event::from_json(&event.to_json()).unwrap();
    assert_eq!(back.payload_json(), Some(text));
    let mut bytes = event.to_json().into_bytes();
    assert_eq!(Event::from_json_simd(&mut bytes).unwrap().payload_json(), Some(text));
}

#[test]
fn typed_payload_errors_say_what_went_wrong() {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct User {
        id: u64,
    }
    let mut event = Event::new(EventSource::System, "a.b");
    assert!(matches!(event.payload::<User>(), Err(PayloadError::Empty)));
    assert!(matches!(event.set_payload_json("{\"id\": "), Err(PayloadError::InvalidJson(_))));
    assert!(event.payload.is_none(), "a rejected payload leaves the event unchanged");
    event.set_payload(&json!({"id": "not a number"})).unwrap();
    let err = event.payload::<User>().unwrap_err();
    assert!(matches!(err, PayloadError::Decode { .. }));
    assert!(err.to_string().contains("User"), "{err}");
    let map_with_bad_keys: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
    assert!(matches!(event.set_payload(&map_with_bad_keys), Err(PayloadError::Serialize(_))));
}

#[test]
fn bad_documents_are_rejected_by_both_decoders() {
    let cases = [
        "",
        "[]",
        "{}",
        r#"{"id":"nope","source":"database","type":"a","status":"pending","retry_count":0,"created_at":"2025-01-27T10:15:30Z"}"#,
        r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"mars","type":"a","status":"pending","retry_count":0,"created_at":"2025-01-27T10:15:30Z"}"#,
        r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"database","type":"a","status":"done","retry_count":0,"created_at":"2025-01-27T10:15:30Z"}"#,
        r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"database","type":"a","status":"pending","retry_count":0,"created_at":"yesterday"}"#,
        r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"database","type":"a","status":"pending","retry_count":0,"created_at":"2025-01-27T10:15:30Z","payload":{"a":}"#,
        r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"database","type":"a","status":"pending","retry_count":0,"created_at":"2025-01-27T10:15:30Z","payload":1,"payload":2}"#,
    ];
    for doc in cases {
        assert!(matches!(Event::from_json(doc), Err(DecodeError::Json(_))), "serde accepted {doc:?}");
        let mut bytes = doc.as_bytes().to_vec();
        assert!(Event::from_json_simd(&mut bytes).is_err(), "simd accepted {doc:?}");
    }
}

#[test]
fn helpers_build_what_they_say() {
    assert_eq!(event_type("auth", "sessions", "create"), "auth.sessions.create");
    let e = Event::new(EventSource::Frontend, "chat.message").with_partition_key("room-1");
    assert_eq!(e.partition(), "room-1");
    assert_eq!(Event::new(EventSource::Frontend, "chat.message").partition(), "chat.message");
    assert_eq!("failed".parse::<EventStatus>().unwrap(), EventStatus::Failed);
    assert_eq!(
        "mars".parse::<EventSource>().unwrap_err().to_string(),
        "unknown event source \"mars\"; expected one of database, websocket, frontend, system, internal"
    );
    assert!(EventStatus::Completed.is_terminal() && !EventStatus::Processing.is_terminal());
    let ids: Vec<EventId> = (0..1000).map(|_| EventId::new()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "v7 ids sort by creation");
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9 _\\-\"\\\\é\u{1F600}\n]{0,12}"]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        arb_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z\"]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

prop_compose! {
    fn arb_event()(
        source in prop::sample::select(EventSource::ALL.to_vec()),
        status in prop::sample::select(EventStatus::ALL.to_vec()),
        event_type in "[a-z]{1,6}(\\.[a-z]{1,6}){0,3}",
        retry_count in 0u32..5,
        error in arb_text(),
        payload in prop::option::of(arb_json()),
        pretty in any::<bool>(),
        user_id in any::<i64>(),
        strings in prop::collection::vec(arb_text(), 5),
        nanos in 0i64..4_000_000_000_000_000_000,
        processed in prop::option::of(0i64..1_000_000_000),
        metadata in prop::collection::btree_map("[a-z]{1,5}", arb_json(), 0..3),
        partition_key in prop::option::of(arb_text()),
    ) -> Event {
        let mut event = Event::new(source, event_type);
        event.status = status;
        event.retry_count = retry_count;
        event.error = error;
        if let Some(payload) = payload {
            let text = if pretty { serde_json::to_string_pretty(&payload) } else { serde_json::to_string(&payload) };
            event.set_payload_json(text.unwrap()).unwrap();
        }
        event.user_id = user_id;
        let [session, instance, schema, entity, operation]: [String; 5] = strings.try_into().unwrap();
        (event.session_id, event.instance_id, event.schema, event.entity, event.operation) =
            (session, instance, schema, entity, operation);
        event.created_at = Timestamp::from_nanosecond(i128::from(nanos)).unwrap();
        event.processed_at = processed.map(|n| Timestamp::from_nanosecond(i128::from(nanos) + i128::from(n)).unwrap());
        event.metadata = metadata.into_iter().collect();
        event.partition_key = partition_key;
        event
    }
}

proptest! {
    #[test]
    fn serde_round_trip_is_identity(event in arb_event()) {
        prop_assert_eq!(Event::from_json(&event.to_json()).unwrap(), event);
    }

    #[test]
    fn simd_and_serde_decoders_give_identical_events(event in arb_event(), pretty in any::<bool>()) {
        let json = if pretty { serde_json::to_string_pretty(&event).unwrap() } else { event.to_json() };
        let mut bytes = json.clone().into_bytes();
        let simd = Event::from_json_simd(&mut bytes).unwrap();
        prop_assert_eq!(&simd, &Event::from_json(&json).unwrap());
        prop_assert_eq!(simd, event);
    }
}
