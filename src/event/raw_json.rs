//! Byte-level work on JSON text that is not decoded: cutting a value's raw text out of a
//! document, and checking a payload's text against the rules every event value keeps.

use std::fmt;
use std::ops::Range;

use serde::de::Error as _;

use crate::Event;

/// The byte range of the value under `key` in the top-level object of `json`, or `None` when
/// the key is absent or the text is not an object. The text is not validated here; a caller
/// parses the whole document afterwards, and a range taken from invalid JSON is never used.
pub(super) fn top_level_value(json: &[u8], key: &str) -> Option<Range<usize>> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    let mut found = None;
    while json.get(i) == Some(&b'"') {
        let key_end = string_end(json, i)?;
        let this_key = &json[i + 1..key_end - 1];
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(json, i + 1);
        let value_end = value_end(json, value_start)?;
        if found.is_none() && key_matches(this_key, key) {
            found = Some(value_start..value_end);
        }
        i = skip_ws(json, value_end);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            Some(b'}') => return found,
            _ => return None,
        }
    }
    None
}

/// Checks the text of one valid JSON value (a payload) against the rules every value in an event
/// keeps (see [`Event::from_json`]): strings hold no lone surrogate, numbers fit an `f64`, arrays
/// and objects nest at most [`Event::MAX_JSON_DEPTH`] deep. One pass over the bytes, nothing
/// decoded: a payload is checked on every decode. The grammar is the caller's to have checked
/// (`RawValue` does); on text that is not JSON the answer means nothing, but there is no panic.
pub(super) fn check_value(text: &str) -> Result<(), serde_json::Error> {
    let json = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = json.get(i) {
        match byte {
            b'"' => i = check_string(json, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > Event::MAX_JSON_DEPTH {
                    return Err(refused(format_args!(
                        "arrays and objects nest deeper than {} at byte {i}",
                        Event::MAX_JSON_DEPTH
                    )));
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = json[i..]
                    .iter()
                    .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .map_or(json.len(), |len| i + len);
                check_number(&text[i..end], i)?;
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn refused(message: fmt::Arguments<'_>) -> serde_json::Error {
    serde_json::Error::custom(message)
}

/// Checks the string whose contents start at `i`; returns the index past its closing quote.
fn check_string(json: &[u8], mut i: usize) -> Result<usize, serde_json::Error> {
    loop {
        match json.get(i) {
            None => return Ok(i),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') if json.get(i + 1) == Some(&b'u') => {
                let escape = i;
                i += 6;
                let scalar = match hex4(json, escape + 2) {
                    // A high surrogate counts only with a low one escaped right after it.
                    Some(0xD800..=0xDBFF) => {
                        let low = json.get(i..i + 2) == Some(&b"\\u"[..])
                            && matches!(hex4(json, i + 2), Some(0xDC00..=0xDFFF));
                        i += if low { 6 } else { 0 };
                        low
                    }
                    Some(0xDC00..=0xDFFF) => false,
                    _ => true,
                };
                if !scalar {
                    return Err(refused(format_args!("lone surrogate in a \\u escape at byte {escape}")));
                }
            }
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
        }
    }
}

/// The four hex digits at `i`, as a UTF-16 code unit.
fn hex4(json: &[u8], i: usize) -> Option<u16> {
    let digits = std::str::from_utf8(json.get(i..i + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

/// Refuses a number that rounds to infinity as an `f64`. Only an exponent or more than 300
/// characters can get there; Rust's parser rounds correctly, as `serde_json`'s does here.
fn check_number(number: &str, at: usize) -> Result<(), serde_json::Error> {
    let may_overflow = number.len() > 300 || number.bytes().any(|b| b == b'e' || b == b'E');
    if may_overflow && number.parse::<f64>().is_ok_and(f64::is_infinite) {
        return Err(refused(format_args!("number out of range at byte {at}")));
    }
    Ok(())
}

fn key_matches(raw_key: &[u8], key: &str) -> bool {
    if raw_key.contains(&b'\\') {
        // An escaped key ("p\u0061yload") is rare; decode it properly.
        let mut quoted = Vec::with_capacity(raw_key.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw_key);
        quoted.push(b'"');
        serde_json::from_slice::<String>(&quoted).is_ok_and(|k| k == key)
    } else {
        raw_key == key.as_bytes()
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Index just past the closing quote of the string opening at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match json.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// Index just past the value starting at `start`.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    match json.get(start)? {
        b'"' => string_end(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match json.get(i)? {
                    b'"' => {
                        i = string_end(json, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let len = json[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(json.len() - start);
            Some(start + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{check_value, top_level_value};
    use crate::Event;
    use crate::event::decode::check_json;

    fn value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        top_level_value(json.as_bytes(), key).map(|r| &json[r])
    }

    #[test]
    fn finds_values_of_every_shape() {
        let doc = r#" { "a" : "x\"}" , "payload":{"k":[1,{"z":"]"}]} ,"n": -1.5e3,"t":true}"#;
        assert_eq!(value(doc, "a"), Some(r#""x\"}""#));
        assert_eq!(value(doc, "payload"), Some(r#"{"k":[1,{"z":"]"}]}"#));
        assert_eq!(value(doc, "n"), Some("-1.5e3"));
        assert_eq!(value(doc, "t"), Some("true"));
        assert_eq!(value(doc, "missing"), None);
    }

    #[test]
    fn nested_keys_are_not_top_level() {
        assert_eq!(value(r#"{"outer":{"payload":1},"payload":2}"#, "payload"), Some("2"));
        assert_eq!(value(r#"{"outer":{"payload":1}}"#, "payload"), None);
    }

    #[test]
    fn escaped_keys_match() {
        assert_eq!(value(r#"{"p\u0061yload":[true]}"#, "payload"), Some("[true]"));
    }

    #[test]
    fn malformed_input_gives_none_not_a_panic() {
        for doc in ["", "[", "{", r#"{"a"#, r#"{"a":"#, r#"{"a":{"#, r#"{"a" 1}"#, "{\"a\":\"\\", "{\"a\":1,"]
        {
            assert_eq!(value(doc, "a"), None, "{doc:?}");
        }
    }

    #[test]
    fn check_value_refuses_with_the_byte_it_refuses_at() {
        let message = |text: &str| check_value(text).unwrap_err().to_string();
        assert_eq!(
            message(r#"["ok", "\ud83d\ude00", "\udc00"]"#),
            "lone surrogate in a \\u escape at byte 24"
        );
        assert_eq!(message(r#"{"\ud800x": 1}"#), "lone surrogate in a \\u escape at byte 2");
        assert_eq!(message("[1, -1e309]"), "number out of range at byte 4");
        let deep =
            format!("{}{}", "[".repeat(Event::MAX_JSON_DEPTH + 1), "]".repeat(Event::MAX_JSON_DEPTH + 1));
        assert_eq!(message(&deep), "arrays and objects nest deeper than 100 at byte 100");
        for fine in
            ["-0", "1e-400", "1.7976931348623157e308", r#""\\ud800""#, r#""\"\u0041""#, &"9".repeat(308)]
        {
            assert!(check_value(fine).is_ok(), "{fine}");
        }
        assert!(check_value(&"9".repeat(309)).is_err(), "10^309 - 1 overflows");
    }

    /// JSON text built to meet every rule's edge: surrogate escapes, paired and not, numbers at
    /// the ends of `f64`, nesting around the limit.
    fn tricky_json() -> impl Strategy<Value = String> {
        let atom = prop::sample::select(vec![
            "-0",
            "1e400",
            "-1e400",
            "1e-400",
            "1.7976931348623157e308",
            "1.7976931348623159e308",
            "123456789012345678901234567890",
            "0.5",
            "true",
            "null",
            r#""\ud800""#,
            r#""a\udc00""#,
            r#""\ud83d\ude00""#,
            r#""\ud83d\u0041""#,
            r#""\\ud800""#,
            r#""x\"\\""#,
            r#""é""#,
        ])
        .prop_map(str::to_owned);
        let tree = atom.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                prop::collection::vec((prop::sample::select(vec![r#""k""#, r#""\udfff""#]), inner), 0..3)
                    .prop_map(|entries| {
                        let entries: Vec<String> =
                            entries.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                        format!("{{{}}}", entries.join(","))
                    }),
            ]
        });
        let limit = Event::MAX_JSON_DEPTH;
        (tree, prop::sample::select(vec![0, limit - 3, limit - 1, limit]))
            .prop_map(|(tree, wrap)| format!("{}{tree}{}", "[".repeat(wrap), "]".repeat(wrap)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        /// The one-pass check gives the visitor's verdict, which decodes every string and number.
        #[test]
        fn check_value_agrees_with_decoding(text in tricky_json()) {
            prop_assert_eq!(check_value(&text).is_ok(), check_json(&text).is_ok(), "{}", text);
        }
    }
}
