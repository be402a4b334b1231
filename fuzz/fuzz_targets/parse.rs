//! The pattern and event-type parsers on arbitrary input: never a panic, every error names the
//! input and a position that is inside it and on a character boundary, and every accepted pattern
//! round-trips through its text.

#![no_main]

use eventbroker::{Pattern, PatternSet, validate_event_type};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };

    match Pattern::parse(input) {
        Ok(pattern) => {
            assert_eq!(pattern.as_str(), input);
            assert_eq!(pattern.to_string(), input);
            let again = Pattern::parse(pattern.as_str()).expect("a parsed pattern re-parses");
            assert_eq!(again, pattern);
        }
        Err(error) => {
            assert_eq!(error.pattern(), input);
            assert!(error.position() <= input.len(), "{error}");
            assert!(input.is_char_boundary(error.position()), "{error}");
            assert!(!error.to_string().is_empty());
        }
    }

    match validate_event_type(input) {
        Ok(()) => {
            // A publishable type is a pattern without wildcards, and it matches exactly itself.
            let pattern = Pattern::parse(input).expect("a valid type is a valid pattern");
            assert!(pattern.matches(input));
            let set: PatternSet<()> = [(pattern, ())].into_iter().collect();
            assert_eq!(set.matches(input).len(), 1);
        }
        Err(error) => {
            assert_eq!(error.event_type(), input);
            assert!(error.position() <= input.len(), "{error}");
            assert!(input.is_char_boundary(error.position()), "{error}");
        }
    }
});
