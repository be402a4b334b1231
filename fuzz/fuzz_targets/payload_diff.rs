//! Differential: `Payload::from_json`, which validates a payload's text in one pass and wraps it as
//! a `RawValue` without parsing it, against `serde_json` on arbitrary bytes. It accepts exactly the
//! text `serde_json` reads as one value (`RawValue::from_string`) that also keeps the payload's
//! rules (it decodes as a `serde_json::Value`, which refuses lone surrogates and numbers beyond
//! `f64`, and nests at most `Event::MAX_JSON_DEPTH` deep); it keeps the text `RawValue` keeps and
//! writes it back unchanged; text that is not JSON gets `serde_json`'s error. A payload read by
//! `Deserialize` gets the same verdict. Bytes that are not UTF-8 cannot be given as a `String`.

#![no_main]

use eventbroker::{Event, Payload, PayloadError};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

/// How deep arrays and objects nest in `value`: `[[1]]` is 2.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(entries) => 1 + entries.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let raw = RawValue::from_string(text.to_owned());
    let keeps_rules = serde_json::from_str::<Value>(text).is_ok_and(|v| depth(&v) <= Event::MAX_JSON_DEPTH);
    let payload = Payload::from_json(text.to_owned());
    match (&raw, &payload) {
        (Ok(raw), Ok(payload)) => {
            assert!(keeps_rules, "accepted {text:?}, which breaks a rule");
            assert_eq!(payload.as_str(), raw.get(), "kept other text than RawValue for {text:?}");
            assert_eq!(serde_json::to_string(payload).unwrap(), raw.get(), "wrote back other text");
        }
        (Ok(_), Err(_)) => assert!(!keeps_rules, "refused {text:?}, which is JSON and keeps the rules"),
        (Err(not_json), Err(PayloadError::InvalidJson(ours))) => {
            assert_eq!(ours.to_string(), not_json.to_string(), "another error for {text:?}");
        }
        (Err(_), Err(other)) => panic!("refused {text:?} with {other:?}"),
        (Err(_), Ok(_)) => panic!("accepted {text:?}, which serde_json does not read as JSON"),
    }
    let deserialized = serde_json::from_str::<Payload>(text);
    assert_eq!(deserialized.ok(), payload.ok(), "Deserialize and from_json disagree on {text:?}");
});
