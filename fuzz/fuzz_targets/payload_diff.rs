//! Differential: `Payload::from_json`, which validates a payload's text in one pass and wraps it as
//! a `RawValue` without parsing it, against `serde_json` on arbitrary bytes. It accepts exactly the
//! text `serde_json` reads as one value (`RawValue::from_string`) that also keeps the payload's
//! rules (it decodes as a `serde_json::Value`, which refuses lone surrogates and numbers beyond
//! `f64`, and nests at most `Event::MAX_JSON_DEPTH` deep) and has no object whose first key is one
//! `serde_json` reserves (its `Value` reads such an object as another value, so it cannot tell:
//! a walk of the text's own keys does); it keeps the text `RawValue` keeps and
//! writes it back unchanged; text that is not JSON gets `serde_json`'s error. A payload read by
//! `Deserialize` gets the same verdict. Bytes that are not UTF-8 cannot be given as a `String`.

#![no_main]

use std::fmt;

use eventbroker::{Event, Payload, PayloadError};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// The keys `serde_json`'s `Value` reads an object by when one comes first (`raw_value` and
/// `arbitrary_precision` features).
const RESERVED: [&str; 2] = ["$serde_json::private::RawValue", "$serde_json::private::Number"];

/// JSON read as `Value` reads it but for its reserved keys, which are plain keys here; and whether
/// an object in it has one of [`RESERVED`] as its first key.
struct Plain {
    value: Value,
    reserved_first_key: bool,
}

impl Plain {
    fn leaf(value: impl Into<Value>) -> Self {
        Self { value: value.into(), reserved_first_key: false }
    }
}

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PlainVisitor)
    }
}

struct PlainVisitor;

impl<'de> Visitor<'de> for PlainVisitor {
    type Value = Plain;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Plain, E> {
        Ok(Plain::leaf(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Plain, E> {
        Ok(Plain::leaf(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Plain, E> {
        Ok(Plain::leaf(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Plain, E> {
        Ok(Plain::leaf(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Plain, E> {
        Ok(Plain::leaf(v))
    }

    fn visit_unit<E>(self) -> Result<Plain, E> {
        Ok(Plain::leaf(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Plain, A::Error> {
        let (mut items, mut reserved_first_key) = (Vec::new(), false);
        while let Some(item) = seq.next_element::<Plain>()? {
            reserved_first_key |= item.reserved_first_key;
            items.push(item.value);
        }
        Ok(Plain { value: Value::Array(items), reserved_first_key })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Plain, A::Error> {
        let (mut members, mut reserved_first_key) = (serde_json::Map::new(), false);
        while let Some(key) = map.next_key::<String>()? {
            reserved_first_key |= members.is_empty() && RESERVED.contains(&key.as_str());
            let member = map.next_value::<Plain>()?;
            reserved_first_key |= member.reserved_first_key;
            members.insert(key, member.value);
        }
        Ok(Plain { value: Value::Object(members), reserved_first_key })
    }
}

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
    let plain = serde_json::from_str::<Plain>(text);
    let keeps_rules = plain
        .as_ref()
        .is_ok_and(|plain| depth(&plain.value) <= Event::MAX_JSON_DEPTH && !plain.reserved_first_key);
    let payload = Payload::from_json(text.to_owned());
    match (&raw, &payload) {
        (Ok(raw), Ok(payload)) => {
            assert!(keeps_rules, "accepted {text:?}, which breaks a rule");
            assert_eq!(payload.as_str(), raw.get(), "kept other text than RawValue for {text:?}");
            assert_eq!(serde_json::to_string(payload).unwrap(), raw.get(), "wrote back other text");
            let value = payload.decode::<Value>().expect("an accepted payload decodes as a Value");
            assert_eq!(value, plain.unwrap().value, "a Value read {text:?} as another value");
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
