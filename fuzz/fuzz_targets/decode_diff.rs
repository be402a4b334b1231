//! Differential: `Event::from_json` (serde_json) against `Event::from_json_simd` (simd-json) on
//! arbitrary bytes. Both accept or both reject, and accept the same event; an accepted event's
//! payload decodes as a `serde_json::Value`, and the event re-encodes to JSON both decode back to
//! it. Bytes that are not UTF-8 are JSON to neither.

#![no_main]

use eventbroker::Event;
use libfuzzer_sys::fuzz_target;

/// Both decoders on `json`: the event they agree on, or `None` when both refuse it.
fn decode_both(json: &[u8]) -> Option<Event> {
    let simd = Event::from_json_simd(&mut json.to_vec());
    let Ok(text) = std::str::from_utf8(json) else {
        assert!(simd.is_err(), "simd-json accepted bytes that are not UTF-8");
        return None;
    };
    match (Event::from_json(text), simd) {
        (Ok(serde), Ok(simd)) => {
            assert_eq!(serde, simd, "the decoders read {text:?} differently");
            Some(serde)
        }
        (Err(_), Err(_)) => None,
        (serde, simd) => panic!("the decoders disagree on {text:?}: serde {serde:?}, simd {simd:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(event) = decode_both(data) else { return };
    if event.payload.is_some() {
        event.payload::<serde_json::Value>().expect("an accepted payload decodes");
    }
    assert_eq!(decode_both(event.to_json().as_bytes()).as_ref(), Some(&event), "re-encoded");
});
