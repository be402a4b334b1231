//! Byte-level work on JSON text that is not decoded: cutting a value's raw text out of a
//! document, and validating a payload's text, grammar and rules in one pass.

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

/// The object keys `serde_json` keeps for itself. Its `Value` reads an object whose first key is one
/// of them as another value: with its `raw_value` feature, which this crate turns on for every
/// crate that builds with it, `{"$serde_json::private::RawValue": "[1]"}` is the array `[1]` and
/// `{"$serde_json::private::RawValue": 1}` is an error; with `arbitrary_precision`,
/// `{"$serde_json::private::Number": "1"}` is the number 1. A payload is to mean the same to every
/// decoder, so it holds no such object.
const RESERVED_KEYS: [&str; 2] = ["$serde_json::private::RawValue", "$serde_json::private::Number"];

/// Checks that `text` is one payload: a JSON value, as `serde_json` reads JSON, that keeps the
/// rules every value in an event keeps (see [`Event::from_json`]): strings hold no lone surrogate,
/// numbers fit an `f64`, arrays and objects nest at most [`Event::MAX_JSON_DEPTH`] deep; and one
/// of its own: no object's first key is one of [`RESERVED_KEYS`]. Whitespace may surround the
/// value; the range returned is the value's own text.
///
/// One pass over the bytes, nothing decoded or allocated: setting a payload costs this and no
/// parse. Text it accepts is what `serde_json`'s `RawValue` accepts, less what breaks a rule (the
/// `payload_diff` fuzz target holds it to that), so the range may be wrapped as a `RawValue`
/// without parsing it again.
///
/// # Errors
/// When `text` is not JSON, the error `serde_json` gives for it; otherwise the first rule broken,
/// with its byte counted from the start of the value.
pub(super) fn check_payload(text: &str) -> Result<Range<usize>, serde_json::Error> {
    let start = skip_ws(text.as_bytes(), 0);
    match validate(&text[start..]) {
        Ok(len) => Ok(start..start + len),
        Err(refusal) => Err(explain(text, refusal)),
    }
}

/// Why [`validate`] stopped, and at which byte of the value.
#[derive(Clone, Copy)]
enum Refusal {
    /// The text is not JSON here.
    NotJson(usize),
    /// A `\u` escape of a surrogate that is not half of a pair.
    LoneSurrogate(usize),
    /// A number that rounds to infinity as an `f64`.
    OutOfRange(usize),
    /// An array or object that opens more than [`Event::MAX_JSON_DEPTH`] deep.
    TooDeep(usize),
    /// An object's first key, one of [`RESERVED_KEYS`].
    ReservedKey(usize),
}

/// The error for text [`validate`] refused. The grammar is checked first, as it was when
/// `serde_json` parsed a payload before its rules were checked: text that is not JSON gets
/// `serde_json`'s words for where, even if a rule breaks earlier in it.
fn explain(text: &str, refusal: Refusal) -> serde_json::Error {
    if let Err(not_json) = serde_json::from_str::<&serde_json::value::RawValue>(text) {
        return not_json;
    }
    let refused = |message: fmt::Arguments<'_>| serde_json::Error::custom(message);
    match refusal {
        Refusal::LoneSurrogate(at) => refused(format_args!("lone surrogate in a \\u escape at byte {at}")),
        Refusal::OutOfRange(at) => refused(format_args!("number out of range at byte {at}")),
        Refusal::TooDeep(at) => refused(format_args!(
            "arrays and objects nest deeper than {} at byte {at}",
            Event::MAX_JSON_DEPTH
        )),
        Refusal::ReservedKey(at) => refused(format_args!(
            "an object's first key is one serde_json reserves ({}) at byte {at}: serde_json's Value \
             reads such an object as another value",
            RESERVED_KEYS.join(", ")
        )),
        // Never: the fuzz target would have found it. Refusing is the safe side of a disagreement.
        Refusal::NotJson(at) => refused(format_args!("not JSON at byte {at}")),
    }
}

/// Validates the JSON value at the start of `text` and the whitespace after it; returns the
/// value's length. The open arrays and objects are kept as their closing bytes, in an array the
/// depth limit bounds: no recursion, no allocation.
fn validate(text: &str) -> Result<usize, Refusal> {
    let json = text.as_bytes();
    // `closers[d]` closes the array or object open at depth `d`, the one enclosing `closer`'s.
    let mut closers = [0u8; Event::MAX_JSON_DEPTH];
    let mut depth = 0;
    // What closes the innermost open array or object: `]` or `}`; 0 at the top level.
    let mut closer = 0u8;
    let mut i = 0;
    loop {
        // `i` is at the first byte of a value.
        i = match json.get(i) {
            Some(b'"') => string(json, i + 1)?,
            Some(b'-' | b'0'..=b'9') => number(text, i)?,
            Some(b't') => literal(json, i, b"true")?,
            Some(b'f') => literal(json, i, b"false")?,
            Some(b'n') => literal(json, i, b"null")?,
            Some(&open @ (b'[' | b'{')) => {
                let Some(slot) = closers.get_mut(depth) else { return Err(Refusal::TooDeep(i)) };
                *slot = closer;
                depth += 1;
                // `[` + 2 is `]`, `{` + 2 is `}`.
                closer = open + 2;
                let first = skip_ws(json, i + 1);
                if json.get(first) != Some(&closer) {
                    i = if closer == b'}' { first_member(json, first)? } else { first };
                    continue;
                }
                depth -= 1;
                closer = closers[depth];
                first + 1
            }
            _ => return Err(Refusal::NotJson(i)),
        };
        // `i` is just past a value: close the arrays and objects it ends, then on to the next value.
        loop {
            if depth == 0 {
                return if skip_ws(json, i) == json.len() { Ok(i) } else { Err(Refusal::NotJson(i)) };
            }
            i = skip_ws(json, i);
            match json.get(i) {
                Some(b',') => {
                    let next = skip_ws(json, i + 1);
                    i = if closer == b'}' { member(json, next)? } else { next };
                    break;
                }
                Some(&byte) if byte == closer => {
                    depth -= 1;
                    closer = closers[depth];
                    i += 1;
                }
                _ => return Err(Refusal::NotJson(i)),
            }
        }
    }
}

/// An object member's key at `i`, and its colon: returns the index of its value.
#[inline(always)]
#[allow(
    clippy::inline_always,
    reason = "once per string or member: the calls cost a fifth of the pass (callgrind)"
)]
fn member(json: &[u8], i: usize) -> Result<usize, Refusal> {
    colon(json, key(json, i)?)
}

/// An object's first member, as [`member`], but its key must not be one of [`RESERVED_KEYS`].
#[inline(always)]
#[allow(
    clippy::inline_always,
    reason = "once per string or member: the calls cost a fifth of the pass (callgrind)"
)]
fn first_member(json: &[u8], i: usize) -> Result<usize, Refusal> {
    let end = key(json, i)?;
    // Any other first byte is the common case: one comparison.
    if matches!(json[i + 1], b'$' | b'\\')
        && RESERVED_KEYS.iter().any(|k| unescapes_to(&json[i + 1..end - 1], k))
    {
        return Err(Refusal::ReservedKey(i));
    }
    colon(json, end)
}

/// The key at `i`: returns the index past its closing quote.
#[inline(always)]
#[allow(
    clippy::inline_always,
    reason = "once per string or member: the calls cost a fifth of the pass (callgrind)"
)]
fn key(json: &[u8], i: usize) -> Result<usize, Refusal> {
    if json.get(i) != Some(&b'"') {
        return Err(Refusal::NotJson(i));
    }
    string(json, i + 1)
}

/// The colon after a key that ends before `i`: returns the index of the member's value.
#[inline(always)]
#[allow(
    clippy::inline_always,
    reason = "once per string or member: the calls cost a fifth of the pass (callgrind)"
)]
fn colon(json: &[u8], i: usize) -> Result<usize, Refusal> {
    let colon = skip_ws(json, i);
    if json.get(colon) != Some(&b':') {
        return Err(Refusal::NotJson(colon));
    }
    Ok(skip_ws(json, colon + 1))
}

/// Whether the contents of a valid JSON string, `raw`, decode to `word`: ASCII, and none of it a
/// character that only a short escape (`\n`, `\"`, ...) writes, so that only a `\u00XX` escape
/// can stand for one of its bytes. No allocation.
fn unescapes_to(raw: &[u8], word: &str) -> bool {
    let mut want = word.bytes();
    let mut i = 0;
    while let Some(&byte) = raw.get(i) {
        let (byte, len) = match (byte, raw.get(i + 1)) {
            (b'\\', Some(b'u')) => match hex4(raw, i + 2).map(u8::try_from) {
                Some(Ok(byte)) if byte.is_ascii() => (byte, 6),
                _ => return false,
            },
            (b'\\', _) => return false,
            _ => (byte, 1),
        };
        if want.next() != Some(byte) {
            return false;
        }
        i += len;
    }
    want.next().is_none()
}

/// The string whose contents start at `i`: returns the index past its closing quote.
#[inline(always)]
#[allow(
    clippy::inline_always,
    reason = "once per string or member: the calls cost a fifth of the pass (callgrind)"
)]
fn string(json: &[u8], mut i: usize) -> Result<usize, Refusal> {
    loop {
        i = skip_unescaped(json, i);
        match json.get(i) {
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => i = escape(json, i)?,
            // A control character, or the end.
            _ => return Err(Refusal::NotJson(i)),
        }
    }
}

/// Past the bytes from `i` that stand for themselves in a string: all but `"`, `\` and the control
/// characters, which must be escaped (the text is a `str`, so the rest is UTF-8 already). Eight
/// bytes at a time while eight are left.
#[inline(always)]
#[allow(
    clippy::inline_always,
    reason = "once per string or member: the calls cost a fifth of the pass (callgrind)"
)]
fn skip_unescaped(json: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH_BITS: u64 = ONES * 0x80;
    while let Some(&chunk) = json.get(i..).and_then(|rest| rest.first_chunk::<8>()) {
        let word = u64::from_le_bytes(chunk);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        // `x - ONES & !x` sets the high bit of each byte of `x` that is zero, and `x - ONES * 0x20
        // & !x` of each byte below 0x20: exactly so up to the first such byte, where the borrow
        // that can set false bits above it starts. The lowest bit set is the first byte to stop at.
        let stops = (quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash
            | word.wrapping_sub(ONES * 0x20) & !word)
            & HIGH_BITS;
        if stops != 0 {
            return i + (stops.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while json.get(i).is_some_and(|&byte| byte >= 0x20 && byte != b'"' && byte != b'\\') {
        i += 1;
    }
    i
}

/// The escape at `i` (a backslash): returns the index past it. A `\u` escape must be a Unicode
/// scalar: a high surrogate counts only with a low one escaped right after it.
fn escape(json: &[u8], i: usize) -> Result<usize, Refusal> {
    match json.get(i + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
        Some(b'u') => match hex4(json, i + 2).ok_or(Refusal::NotJson(i))? {
            0xD800..=0xDBFF
                if json.get(i + 6..i + 8) == Some(&b"\\u"[..])
                    && matches!(hex4(json, i + 8), Some(0xDC00..=0xDFFF)) =>
            {
                Ok(i + 12)
            }
            0xD800..=0xDFFF => Err(Refusal::LoneSurrogate(i)),
            _ => Ok(i + 6),
        },
        _ => Err(Refusal::NotJson(i)),
    }
}

/// The four hex digits at `i`, as a UTF-16 code unit.
fn hex4(json: &[u8], i: usize) -> Option<u16> {
    json.get(i..i + 4)?.iter().try_fold(0, |unit, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            b'A'..=b'F' => digit - b'A' + 10,
            _ => return None,
        };
        Some(unit << 4 | u16::from(nibble))
    })
}

/// The number starting at `start`: returns the index past it. Refuses one that rounds to infinity
/// as an `f64`; only an exponent or more than 300 characters can get there, and Rust's parser
/// rounds correctly, as `serde_json`'s does here.
#[inline]
fn number(text: &str, start: usize) -> Result<usize, Refusal> {
    let json = text.as_bytes();
    let mut i = start + usize::from(json[start] == b'-');
    match json.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = skip_digits(json, i + 1),
        _ => return Err(Refusal::NotJson(i)),
    }
    if json.get(i) == Some(&b'.') {
        i = digits(json, i + 1)?;
    }
    let exponent = matches!(json.get(i), Some(b'e' | b'E'));
    if exponent {
        i += 1 + usize::from(matches!(json.get(i + 1), Some(b'+' | b'-')));
        i = digits(json, i)?;
    }
    if (exponent || i - start > 300) && text[start..i].parse::<f64>().is_ok_and(f64::is_infinite) {
        return Err(Refusal::OutOfRange(start));
    }
    Ok(i)
}

/// One or more digits at `i`: returns the index past them.
fn digits(json: &[u8], i: usize) -> Result<usize, Refusal> {
    match json.get(i) {
        Some(b'0'..=b'9') => Ok(skip_digits(json, i + 1)),
        _ => Err(Refusal::NotJson(i)),
    }
}

fn skip_digits(json: &[u8], mut i: usize) -> usize {
    while json.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// `true`, `false` or `null` at `i`: returns the index past it.
fn literal(json: &[u8], i: usize, word: &[u8]) -> Result<usize, Refusal> {
    if json.get(i..i + word.len()) == Some(word) { Ok(i + word.len()) } else { Err(Refusal::NotJson(i)) }
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

#[inline]
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

    use super::{check_payload, top_level_value};
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
    fn a_broken_rule_is_reported_with_the_byte_it_breaks_at() {
        let message = |text: &str| check_payload(text).unwrap_err().to_string();
        assert_eq!(
            message(r#"["ok", "\ud83d\ude00", "\udc00"]"#),
            "lone surrogate in a \\u escape at byte 24"
        );
        assert_eq!(message(r#"{"\ud800x": 1}"#), "lone surrogate in a \\u escape at byte 2");
        assert_eq!(message("[1, -1e309]"), "number out of range at byte 4");
        assert_eq!(message(" \n [1, -1e309]"), "number out of range at byte 4", "counted from the value");
        let deep =
            format!("{}{}", "[".repeat(Event::MAX_JSON_DEPTH + 1), "]".repeat(Event::MAX_JSON_DEPTH + 1));
        assert_eq!(message(&deep), "arrays and objects nest deeper than 100 at byte 100");
        for fine in
            ["-0", "1e-400", "1.7976931348623157e308", r#""\\ud800""#, r#""\"\u0041""#, &"9".repeat(308)]
        {
            assert!(check_payload(fine).is_ok(), "{fine}");
        }
        assert!(check_payload(&"9".repeat(309)).is_err(), "10^309 - 1 overflows");
    }

    #[test]
    fn an_object_that_serde_json_reads_as_another_value_is_refused() {
        let message = |text: &str| check_payload(text).unwrap_err().to_string();
        let refusal = |at: usize| {
            format!(
                "an object's first key is one serde_json reserves ($serde_json::private::RawValue, \
                 $serde_json::private::Number) at byte {at}: serde_json's Value reads such an object as \
                 another value"
            )
        };
        assert_eq!(message(r#"{"$serde_json::private::RawValue": 24}"#), refusal(1));
        assert_eq!(message(r#"[1, {"$serde_json::private::Number": "1"}]"#), refusal(5));
        assert_eq!(message(r#"{"a": {"\u0024serde_json::private::R\u0061wValue": "[1]"}}"#), refusal(7));
        // As serde_json's `Value` reads it: so for its first key only, and for the whole key only.
        for fine in [
            r#"{"a": 1, "$serde_json::private::RawValue": 2}"#,
            r#"{"$serde_json::private::RawValu": 1}"#,
            r#"{"$serde_json::private::RawValueX": 1}"#,
            r#"{"\u0024serde_json::private::RawValu\u0065\n": 1}"#,
            r#"{"$": 1}"#,
            r#"{"\n": 1}"#,
            r#"["$serde_json::private::RawValue"]"#,
        ] {
            assert!(check_payload(fine).is_ok(), "{fine}");
            assert!(
                serde_json::from_str::<serde_json::Value>(fine).unwrap().is_array() == fine.starts_with('[')
            );
        }
        // Grammar first, as for every rule.
        assert_eq!(message(r#"{"$serde_json::private::Number": }"#), "expected value at line 1 column 34");
    }

    #[test]
    fn text_that_is_not_json_gets_serde_jsons_words_even_past_a_broken_rule() {
        let message = |text: &str| check_payload(text).unwrap_err().to_string();
        assert_eq!(message(r#"{"id": "#), "EOF while parsing a value at line 1 column 7");
        assert_eq!(message(r#"["\ud800", }"#), "expected value at line 1 column 12");
        assert_eq!(message("[1e400] x"), "trailing characters at line 1 column 9");
        assert_eq!(message("\"\\u12G4\""), "invalid escape at line 1 column 7");
    }

    #[test]
    fn the_value_is_cut_from_the_whitespace_around_it() {
        let text = " \t\n\r{\"a\" : [1 , 2]}\n ";
        assert_eq!(&text[check_payload(text).unwrap()], r#"{"a" : [1 , 2]}"#);
        assert_eq!(check_payload("null").unwrap(), 0..4);
    }

    /// JSON at the edges of its grammar, after the cases of the JSON test suite, and of the rules.
    const VALID: &[&str] = &[
        "0",
        "-0",
        "-0.0e-0",
        "1E+2",
        "1e-2",
        "0.5",
        "-123.456E78",
        "1e-400",
        "true",
        "false",
        "null",
        r#""""#,
        r#""\"\\\/\b\f\n\r\t""#,
        r#""\u0000\uFFFF\uffff\u00e9""#,
        r#""\uD83D\uDE00""#,
        "\"\u{7f}é€\u{1F600}\"",
        "[]",
        "{}",
        " [ ] ",
        "[[],{}]",
        r#"{"":0}"#,
        r#"{"a":{"b":[null,{}]},"a":2}"#,
        "[1,2 , 3]",
        "\t\n\r 1 \t\n\r",
        r#"{ "k" : "v" , "n" : [ true , false ] }"#,
    ];

    const INVALID: &[&str] = &[
        "",
        " ",
        "[",
        "]",
        "{",
        "}",
        "[1,]",
        "[,1]",
        "[1 2]",
        "[1]]",
        "[[1]",
        "[}",
        "{]",
        r#"{"a":[}]"#,
        r#"{"a":1,}"#,
        "{,}",
        r#"{"a"}"#,
        r#"{"a" 1}"#,
        r#"{"a":1 "b":2}"#,
        "{a:1}",
        "{1:1}",
        "['a']",
        "01",
        "-01",
        "-",
        "+1",
        ".5",
        "1.",
        "1.e5",
        "1e",
        "1e+",
        "-a",
        "0x10",
        "1_000",
        "NaN",
        "Infinity",
        "-Infinity",
        "tru",
        "truex",
        "nul",
        "True",
        r#""abc"#,
        r#""\x""#,
        r#""\u12""#,
        r#""\u12G4""#,
        r#""\u+abc""#,
        r#""\u{1F600}""#,
        "\"a\tb\"",
        "\"\n\"",
        "\"\u{0}\"",
        "\"\u{1f}\"",
        r#""\""#,
        "1 2",
        "[] []",
        "[1]x",
        "\u{feff}1",
        "\u{a0}1",
        "\u{c}1",
        "//c\n1",
        "/*c*/1",
        // The rules.
        r#""\ud800""#,
        r#""\udc00""#,
        r#""\ud800\u0041""#,
        r#""\ud800\ud800""#,
        r#""\ud800\\udc00""#,
        r#"{"\udfff":1}"#,
        "1e400",
        "-1e400",
        "[1e309]",
    ];

    #[test]
    fn a_corpus_of_valid_and_invalid_json() {
        for text in VALID {
            assert!(check_json(text).is_ok(), "the reference refuses {text:?}");
            assert!(check_payload(text).is_ok(), "{text:?}");
        }
        let deep = |depth| format!("{}0{}", "[{\"k\":".repeat(depth), "}]".repeat(depth));
        assert!(check_payload(&deep(Event::MAX_JSON_DEPTH / 2)).is_ok());
        for text in INVALID.iter().copied().chain([deep(Event::MAX_JSON_DEPTH / 2 + 1).as_str()]) {
            assert!(check_json(text).is_err(), "the reference accepts {text:?}");
            assert!(check_payload(text).is_err(), "{text:?}");
        }
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
        fn check_payload_agrees_with_decoding(text in tricky_json()) {
            prop_assert_eq!(check_payload(&text).is_ok(), check_json(&text).is_ok(), "{}", text);
        }

        /// The same on text that is mostly not JSON: every kind of grammar error, at every kind of
        /// place, before and after a broken rule.
        #[test]
        fn check_payload_agrees_with_decoding_on_broken_text(text in broken_json()) {
            let verdict = check_payload(&text);
            prop_assert_eq!(verdict.is_ok(), check_json(&text).is_ok(), "{:?}", text);
            if let Ok(value) = verdict {
                prop_assert_eq!(&text[value], text.trim_matches([' ', '\t', '\n', '\r']));
            }
        }
    }

    /// [`tricky_json`] with one to four bytes inserted, removed or replaced by JSON's punctuation,
    /// escapes, digits, letters of its words, whitespace or a control character.
    fn broken_json() -> impl Strategy<Value = String> {
        const BYTES: &[u8] = b"[]{},:\"\\ \t\n\r0159-+.eEuUdDaAfFtrsnlx/\x00\x1f";
        let edit = (any::<prop::sample::Index>(), 0..3u8, prop::sample::select(BYTES));
        (tricky_json(), prop::collection::vec(edit, 1..5)).prop_map(|(text, edits)| {
            let mut bytes = text.into_bytes();
            for (at, kind, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match kind {
                    0 => bytes.insert(i, byte),
                    1 if i < bytes.len() => drop(bytes.remove(i)),
                    _ if i < bytes.len() => bytes[i] = byte,
                    _ => bytes.push(byte),
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    }
}
