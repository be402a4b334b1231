//! The event model: wire compatibility with the Go seed, round trips, and the two decoders.

use eventbroker::{DecodeError, Event, EventId, EventSource, EventStatus, Payload, PayloadError, event_type};
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
fn payload_text_is_the_value_without_the_whitespace_around_it() {
    let mut event = Event::new(EventSource::Internal, "x.y");
    event.set_payload_json(" \n\t{\"a\": [1, 2]}\r\n ").unwrap();
    assert_eq!(event.payload_json(), Some(r#"{"a": [1, 2]}"#));
    assert!(event.to_json().contains(r#""payload":{"a": [1, 2]},"#), "{}", event.to_json());
    event.set_payload_json(" null ").unwrap();
    assert!(event.payload.is_none(), "a JSON null with whitespace around it clears the payload");
}

#[test]
fn raw_payload_errors_are_serde_jsons_for_text_that_is_not_json() {
    let message = |text: &str| Payload::from_json(text.to_owned()).unwrap_err().to_string();
    assert_eq!(
        message(r#"{"id": "#),
        "the payload is not valid JSON: EOF while parsing a value at line 1 column 7"
    );
    assert_eq!(message("[1,]"), "the payload is not valid JSON: expected value at line 1 column 4");
    assert_eq!(
        message(r#"["\udc00"]"#),
        "the payload is not valid JSON: lone surrogate in a \\u escape at byte 2"
    );
}

#[test]
fn an_event_reads_the_clock_once_for_its_id_and_its_time() {
    let events: Vec<Event> = (0..1_000).map(|_| Event::new(EventSource::System, "a.b")).collect();
    for event in &events {
        let (seconds, nanos) = event.id.as_uuid().get_timestamp().expect("a v7 id has a time").to_unix();
        let millis = i64::try_from(seconds).unwrap() * 1_000 + i64::from(nanos / 1_000_000);
        assert_eq!(millis, event.created_at.as_millisecond());
    }
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "ids increase on one thread");
}

#[test]
fn entity_events_are_typed_schema_entity_operation_at_any_length() {
    // Inline up to 24 bytes, on the heap past them; multi-byte characters are kept whole.
    for (schema, entity, operation) in [
        ("a", "b", "c"),
        ("public", "customers", "updat"),
        ("public", "customers", "update"),
        ("public", "customers", "update!"),
        ("inventory", "warehouse_locations", "update"),
        ("é", "ü😀", "ß"),
    ] {
        let event = Event::for_entity(EventSource::Database, schema, entity, operation);
        assert_eq!(event.event_type, event_type(schema, entity, operation));
        assert_eq!((event.schema.as_str(), event.entity.as_str()), (schema, entity));
        assert_eq!(event.operation, operation);
    }
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

/// The required fields of an event, without the closing brace: append fields, then `}`.
const HEAD: &str = r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"database","type":"a","status":"pending","created_at":"2025-01-27T10:15:30Z""#;

/// An event document: the required fields, `retry_count` 0 unless `fields` sets it, and `fields`.
fn doc_with(fields: &str) -> String {
    let retry = if fields.contains("\"retry_count\"") { "" } else { ",\"retry_count\":0" };
    format!("{HEAD}{retry},{fields}}}")
}

/// Decodes `doc` with both decoders and fails unless they agree: the same event, or both errors.
fn decode_both(doc: &str) -> Option<Event> {
    let serde = Event::from_json(doc);
    let mut bytes = doc.as_bytes().to_vec();
    let simd = Event::from_json_simd(&mut bytes);
    match (serde, simd) {
        (Ok(serde), Ok(simd)) => {
            assert_eq!(serde, simd, "the decoders disagree on {doc:.200}");
            Some(serde)
        }
        (Err(_), Err(_)) => None,
        (serde, simd) => panic!("serde: {serde:?}, simd: {simd:?}, on {doc:.200}"),
    }
}

/// `[[…[1]…]]`: arrays nested `depth` deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn negative_zero_is_the_float_minus_zero_to_both_decoders() {
    assert!(decode_both(&doc_with(r#""retry_count":-0"#)).is_none(), "retry_count is unsigned");
    assert!(decode_both(&doc_with(r#""user_id":-0"#)).is_none(), "user_id is an integer");
    assert_eq!(decode_both(&doc_with(r#""user_id":-1"#)).unwrap().user_id, -1);
    let event = decode_both(&doc_with(r#""metadata":{"z":-0,"f":-0.0,"i":0}"#)).unwrap();
    let z = event.metadata["z"].as_f64().unwrap();
    assert!(event.metadata["z"].is_f64() && z == 0.0 && z.is_sign_negative(), "{:?}", event.metadata);
    assert!(event.metadata["i"].is_u64(), "{:?}", event.metadata);
    assert_eq!(decode_both(&doc_with(r#""payload":-0"#)).unwrap().payload_json(), Some("-0"));
}

#[test]
fn lone_surrogates_are_refused_wherever_they_are() {
    for fields in [
        r#""payload":"\ud800""#,
        r#""payload":{"k":["\udfff"]}"#,
        r#""payload":{"\ud800":1}"#,
        r#""metadata":{"k":"\ud800"}"#,
        r#""later_field":"\ud800x""#,
        r#""later_field":{"\udc00":true}"#,
    ] {
        assert!(decode_both(&doc_with(fields)).is_none(), "{fields}");
    }
    let pair = decode_both(&doc_with(r#""payload":"\ud83d\ude00""#)).unwrap();
    assert_eq!(pair.payload::<String>().unwrap(), "\u{1F600}");

    let mut event = Event::new(EventSource::System, "a.b");
    assert!(matches!(event.set_payload_json(r#""\ud800""#), Err(PayloadError::InvalidJson(_))));
    assert!(matches!(event.set_payload_json(r#"{"\udc00":1}"#), Err(PayloadError::InvalidJson(_))));
    assert!(event.payload.is_none());
}

#[test]
fn numbers_beyond_f64_are_refused_wherever_they_are() {
    for fields in [
        r#""payload":1e400"#,
        r#""payload":[-1e400]"#,
        r#""payload":1e99999999999999999999"#,
        r#""metadata":{"k":1e400}"#,
        r#""later_field":{"n":-1e400}"#,
    ] {
        assert!(decode_both(&doc_with(fields)).is_none(), "{fields}");
    }
    // Underflow is not overflow: both read it as 0, and the payload keeps its text.
    let tiny = decode_both(&doc_with(r#""payload":1e-400,"metadata":{"k":1e-400}"#)).unwrap();
    assert_eq!(tiny.payload_json(), Some("1e-400"));
    assert_eq!(tiny.payload::<f64>().unwrap().to_bits(), 0.0f64.to_bits());
    assert_eq!(tiny.metadata["k"], json!(0.0));
    let big = decode_both(&doc_with(r#""payload":123456789012345678901234567890"#)).unwrap();
    assert_eq!(big.payload::<f64>().unwrap().to_bits(), 1.234_567_890_123_456_8e29f64.to_bits());

    let mut event = Event::new(EventSource::System, "a.b");
    assert!(matches!(event.set_payload_json("1e400"), Err(PayloadError::InvalidJson(_))));
    assert!(matches!(event.set_payload_json("[0, -1e309]"), Err(PayloadError::InvalidJson(_))));
    assert!(event.payload.is_none());
}

#[test]
fn nesting_is_limited_to_max_json_depth_everywhere() {
    let limit = Event::MAX_JSON_DEPTH;
    assert_eq!(limit, 100);
    for at in ["payload", "metadata", "later_field"] {
        let field = |depth: usize| {
            let value = nested(depth);
            if at == "metadata" {
                format!(r#""metadata":{{"k":{value}}}"#)
            } else {
                format!(r#""{at}":{value}"#)
            }
        };
        let deepest = decode_both(&doc_with(&field(limit))).unwrap_or_else(|| panic!("{at} at the limit"));
        if at == "payload" {
            deepest.payload::<Value>().expect("a payload at the limit decodes");
        }
        for depth in [limit + 1, 1_000, 10_000] {
            assert!(decode_both(&doc_with(&field(depth))).is_none(), "{at} {depth} deep");
        }
    }

    let mut event = Event::new(EventSource::System, "a.b");
    event.set_payload_json(nested(limit)).unwrap();
    event.payload::<Value>().unwrap();
    assert!(matches!(event.set_payload_json(nested(limit + 1)), Err(PayloadError::InvalidJson(_))));
    let too_deep: Value = (0..=limit).fold(json!(1), |inner, _| json!([inner]));
    assert!(matches!(event.set_payload(&too_deep), Err(PayloadError::Serialize(_))));
    assert_eq!(event.payload_json(), Some(nested(limit).as_str()), "a refused payload changes nothing");

    // Values built in memory reach the limit and read back; one more level is refused where it is
    // built (the payload) or published (metadata: see the broker's tests).
    let deepest: Value = (1..limit).fold(json!([1]), |inner, _| json!([inner]));
    let event = Event::new(EventSource::System, "a.b")
        .with_payload_value(deepest.clone())
        .with_metadata("k", deepest.clone())
        .with_metadata("m", json!({ "inner": (2..limit).fold(json!([1]), |inner, _| json!([inner])) }));
    let back = decode_both(&event.to_json()).expect("an event at the limit reads back");
    assert_eq!((back.payload::<Value>().unwrap(), &back.metadata["k"]), (deepest.clone(), &deepest));
}

#[test]
#[should_panic(expected = "deeper than Event::MAX_JSON_DEPTH (100)")]
fn a_payload_value_too_deep_to_read_back_is_refused_where_it_is_built() {
    let too_deep: Value = (0..Event::MAX_JSON_DEPTH).fold(json!([1]), |inner, _| json!([inner]));
    let _ = Event::new(EventSource::System, "a.b").with_payload_value(too_deep);
}

/// `serde_json`'s `Value` reads `{"$serde_json::private::RawValue": "[1]"}` as `[1]`, and fails on
/// `{"$serde_json::private::RawValue": 1}`: a payload holding such an object would mean another
/// thing to it than its text says, so no way of making a payload accepts one.
#[test]
fn a_payload_that_serde_jsons_value_reads_as_another_value_is_refused_everywhere() {
    let smuggled = r#"{"$serde_json::private::RawValue": "{\"admin\": true}"}"#;
    assert_eq!(serde_json::from_str::<Value>(smuggled).unwrap(), json!({"admin": true}), "the quirk itself");
    let mut event = Event::new(EventSource::System, "a.b").with_payload_value(json!({"ok": 1}));
    for text in [
        smuggled.to_owned(),
        r#"[{"$serde_json::private::RawValue": 1}]"#.to_owned(),
        r#"{"a": {"\u0024serde_json::private::Number": "1"}}"#.to_owned(),
    ] {
        let message = event.set_payload_json(&text).unwrap_err().to_string();
        assert!(message.contains("first key is one serde_json reserves"), "{message}");
        assert!(Payload::from_json(text.clone()).is_err(), "{text}");
        assert!(serde_json::from_str::<Payload>(&text).is_err(), "{text}");
        assert!(decode_both(&doc_with(&format!(r#""payload":{text}"#))).is_none(), "{text}");
    }
    assert_eq!(event.payload_json(), Some(r#"{"ok":1}"#), "a refused payload changes nothing");

    // A value built in memory: `json!` writes the key as a plain one.
    let built = json!({"list": [{"$serde_json::private::RawValue": "[1]"}]});
    assert!(matches!(event.set_payload(&built), Err(PayloadError::Serialize(_))));

    // Only as serde_json reads it: the first key, the whole key; and metadata is not a payload.
    for fine in
        [r#"{"a": 1, "$serde_json::private::RawValue": 2}"#, r#"{"$serde_json::private::RawValues": 2}"#]
    {
        event.set_payload_json(fine).unwrap();
        assert_eq!(event.payload::<Value>().unwrap(), serde_json::from_str::<Value>(fine).unwrap());
    }
    let doc = doc_with(r#""metadata":{"k":{"$serde_json::private::RawValue":1}}"#);
    assert_eq!(decode_both(&doc).unwrap().metadata["k"], json!({"$serde_json::private::RawValue": 1}));
}

#[test]
#[should_panic(expected = "first key is one serde_json reserves")]
fn a_payload_value_that_serde_jsons_value_reads_as_another_is_refused_where_it_is_built() {
    let _ = Event::new(EventSource::System, "a.b")
        .with_payload_value(json!({"ok": [{"$serde_json::private::RawValue": "[1]"}]}));
}

#[test]
fn an_event_is_a_json_object() {
    let array = r#"["3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","database","a","pending",0,"",null,0,"","","","","","2025-01-27T10:15:30Z",null,null,null,null]"#;
    assert!(decode_both(array).is_none());
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
            (session.into(), instance.into(), schema.into(), entity.into(), operation.into());
        event.created_at = Timestamp::from_nanosecond(i128::from(nanos)).unwrap();
        event.processed_at = processed.map(|n| Timestamp::from_nanosecond(i128::from(nanos) + i128::from(n)).unwrap());
        event.metadata = metadata.into_iter().collect();
        event.partition_key = partition_key.map(Into::into);
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

/// JSON text the two parsers are most likely to read differently: `-0`, numbers at and beyond the
/// ends of `f64` and of the integer types, surrogate escapes, control escapes, nesting around the
/// depth limit.
fn arb_json_text() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        prop::sample::select(vec![
            "-0",
            "0",
            "-0.0",
            "0.0",
            "-1",
            "7",
            "1.5",
            "1e2",
            "1E+2",
            "-1e400",
            "1e400",
            "1e-400",
            "2.4703282292062328e-324",
            "1.7976931348623157e308",
            "1.7976931348623159e308",
            "4294967295",
            "4294967296",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
            "123456789012345678901234567890",
            "true",
            "false",
            "null",
            r#""a""#,
            r#""\ud800""#,
            r#""\udc00x""#,
            r#""\ud83d\ude00""#,
            r#""\u0000""#,
            r#""é\n\"""#,
            r#""""#,
        ])
        .prop_map(str::to_owned),
        (-1e300f64..1e300).prop_map(|f| f.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
    ];
    let tree = atom.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec(
                (prop::sample::select(vec![r#""k""#, r#""\ud800""#, r#""""#]), inner),
                0..3
            )
            .prop_map(|entries| {
                let entries: Vec<String> = entries.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", entries.join(","))
            }),
        ]
    });
    (tree, prop_oneof![4 => Just(0usize), 1 => Just(Event::MAX_JSON_DEPTH - 2), 1 => Just(Event::MAX_JSON_DEPTH + 1)])
        .prop_map(|(tree, wrap)| format!("{}{tree}{}", "[".repeat(wrap), "]".repeat(wrap)))
}

prop_compose! {
    /// An event document with tricky text in one or more of the places each decoder reads
    /// differently: the integer fields, the payload, metadata values, an unknown field.
    fn arb_tricky_document()(
        retry_count in prop::option::of(arb_json_text()),
        user_id in prop::option::of(arb_json_text()),
        payload in prop::option::of(arb_json_text()),
        metadata in prop::option::of(arb_json_text()),
        unknown in prop::option::of(arb_json_text()),
        unknown_first in any::<bool>(),
    ) -> String {
        let mut fields = Vec::new();
        let unknown = unknown.map(|value| format!(r#""later_field":{value}"#));
        if unknown_first {
            fields.extend(unknown.clone());
        }
        fields.push(format!(r#""retry_count":{}"#, retry_count.unwrap_or_else(|| "3".into())));
        fields.extend(user_id.map(|value| format!(r#""user_id":{value}"#)));
        fields.extend(payload.map(|value| format!(r#""payload":{value}"#)));
        fields.extend(metadata.map(|value| format!(r#""metadata":{{"k":{value}}}"#)));
        if !unknown_first {
            fields.extend(unknown);
        }
        doc_with(&fields.join(","))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The decoders agree on every document, and what they accept survives: its payload decodes as
    /// a `Value`, and the event re-encodes to JSON that decodes to the same event.
    #[test]
    fn decoders_agree_on_tricky_documents(doc in arb_tricky_document()) {
        if let Some(event) = decode_both(&doc) {
            if event.payload.is_some() {
                prop_assert!(event.payload::<Value>().is_ok(), "{:?}", event.payload_json());
            }
            prop_assert_eq!(decode_both(&event.to_json()), Some(event));
        }
    }
}
