//! The pattern language: event types, subscription patterns, and how they match.
//!
//! An event type is a dot-separated list of segments, `schema.entity.operation` by convention
//! (`public.users.create`). Matching is case-sensitive. A pattern is a type whose segments may
//! also be wildcards:
//!
//! | segment | matches |
//! |---|---|
//! | a literal, `users` | exactly that segment |
//! | `*` | exactly one segment |
//! | `>` (last segment only) | one or more remaining segments |
//!
//! A pattern that is exactly `*` matches every type, whatever its length; this keeps the seed's
//! rule that `*` means "all events".
//!
//! ```
//! use eventbroker::Pattern;
//!
//! let p = Pattern::parse("public.*.create")?;
//! assert!(p.matches("public.users.create"));
//! assert!(!p.matches("public.users.update"));
//!
//! let tail = Pattern::parse("audit.>")?;
//! assert!(tail.matches("audit.login"));
//! assert!(tail.matches("audit.login.failed"));
//! assert!(!tail.matches("audit"));
//! # Ok::<(), eventbroker::PatternError>(())
//! ```
//!
//! ## Limits
//! Types and patterns are at most [`MAX_NAME_LEN`] (255) bytes and [`MAX_SEGMENTS`] (32)
//! segments. Segments are non-empty and contain no whitespace, control, format or otherwise
//! invisible characters (U+200B, U+FEFF: see [`SyntaxErrorKind::InvisibleChar`]), so two names that
//! look the same are the same. Wildcards are whole segments; an event type contains none. Types
//! are checked when published, patterns when parsed, each with an error naming the input and the
//! byte where it goes wrong.
//!
//! ## Compiled matching
//! [`Pattern::matches`] tests one pattern and is the reference. A broker holds many patterns in a
//! [`PatternSet`], a trie whose match cost depends on the type's segments and the wildcard
//! branches taken, never on the number of patterns, and repeated types hit a [`MatchCache`].
//!
//! ```
//! use eventbroker::{MatchCache, Pattern, PatternSet};
//!
//! let mut subscriptions = PatternSet::new();
//! subscriptions.insert(&Pattern::parse("public.*.create")?, "welcome-mail");
//! subscriptions.insert(&Pattern::parse("audit.>")?, "audit-log");
//! subscriptions.insert(&Pattern::parse("*")?, "metrics");
//!
//! // A worker keeps one cache and looks every event's type up through it.
//! let mut cache = MatchCache::new(4096);
//! assert_eq!(cache.get_or_match(&subscriptions, "public.users.create"), ["welcome-mail", "metrics"]);
//! assert_eq!(cache.get_or_match(&subscriptions, "audit.login.failed"), ["audit-log", "metrics"]);
//!
//! // Subscribing publishes a new version; a reader still holding the old one is unaffected,
//! // and the cache notices the new generation by itself.
//! let published = subscriptions.clone();
//! subscriptions.insert(&Pattern::parse("audit.login.*")?, "alarm");
//! assert_eq!(cache.get_or_match(&published, "audit.login.failed"), ["audit-log", "metrics"]);
//! assert_eq!(cache.get_or_match(&subscriptions, "audit.login.failed"), ["audit-log", "metrics", "alarm"]);
//! # Ok::<(), eventbroker::PatternError>(())
//! ```
//!
//! ### Guarantees
//! - **Order.** A set returns its matches in [`EntryId`] order, which is insertion order, and so
//!   does the cache. An entry matches at most once; two entries with the same pattern are two
//!   matches.
//! - **Cold match: O(segments × wildcard branches).** A match splits the type once and walks the
//!   trie depth-first, taking at each node the literal edge named by the next segment (one hash
//!   lookup) and the `*` edge, and collecting the `>` entries hanging there. That is at most
//!   `2^(s+1) - 1` nodes for a type of `s` segments (15 for `schema.entity.op`); in practice it
//!   is the wildcard branches that exist along the type's path. Nothing is proportional to the
//!   number of entries.
//! - **No allocation on the match path** for up to 8 results ([`Matches::INLINE`]) and types of up
//!   to [`MAX_SEGMENTS`] segments; a warm cache allocates nothing on hits, nor on misses whose
//!   type and values fit the slot buffers they replace.
//! - **Persistent versions.** [`Clone`] of a set is O(1). `insert` and `remove` on a set that
//!   shares nodes with a clone copy only the pattern's path (at most 33 nodes), each copy costing
//!   its children and entries, with nodes of more than 1024 literal children split into 64
//!   separately shared maps so a copy costs 64 plus a 64th of them. Every other node stays
//!   shared, and the clone never sees the change. On a set that shares nothing, the same calls
//!   mutate in place. A `remove` that finds nothing copies nothing.
//! - **Generations.** Every version of every set carries a [`PatternSet::generation`] unique in
//!   the process; a [`MatchCache`] result is only served for the generation it was computed
//!   under, so a cache can follow a broker's successive snapshots, or serve several sets, and
//!   never returns a stale result. A new generation costs the cache nothing up front.
//! - **Bounded cache, no thrashing.** A cache holds its capacity (rounded up to a power of two)
//!   in 8-way sets with least-recently-used replacement: a hit is one hash, one probe of a cache
//!   line and one string compare; a miss is the cold match plus copying the type and the values
//!   into a slot that keeps its buffers. With far more types in play than it holds, the cache
//!   costs about what matching without it costs.
//! - **No locks.** Matching reads an immutable snapshot; the cache is per thread (`&mut self`).
//!
//! ### Measured
//! `cargo bench --bench matching` on the development machine (2 vCPU, shared with other builds;
//! compare ratios within one run), values `u64`, a `schema.entity.op` mix of literals, `*`, `>`
//! and catch-alls in which a queried type matches about 5.5 entries at every size. Per type:
//!
//! | entries | cold match | cache hit | 10× more types than the cache: cached / cold | scanning every pattern | clone + insert |
//! |---:|---:|---:|---:|---:|---:|
//! | 10 | 58 ns | 6 ns | 1.18× | 142 ns | 0.3 µs |
//! | 1,000 | 77 ns | 6 ns | 1.13× | 13 µs | 1.1 µs |
//! | 100,000 | 97 ns | 6 ns | 0.98× | 1.2 ms (12,600× the trie) | 2.0 µs |
//! | 1,000,000 | 96 ns | 6 ns | 0.94× | not run | 6.5 µs |
//!
//! The cold figures query 256 types, whose trie paths stay in the CPU caches. Spread over 10,240
//! types, the nodes a match touches are mostly out of the caches at large sizes, and a cold match
//! costs 185 ns at 100,000 entries and 290 ns at 1,000,000: memory latency, not more work.
//! Building a set of a million entries in place takes about a second.

mod cache;
mod trie;

use std::fmt;
use std::str::FromStr;

pub use self::cache::{CacheStats, MatchCache};
pub use self::trie::{EntryId, Matches, PatternSet};
use crate::error::{EventTypeError, PatternError, SyntaxErrorKind};

/// Longest event type or pattern accepted, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Most segments an event type or pattern may have.
pub const MAX_SEGMENTS: usize = 32;

/// One segment of a parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Segment {
    /// Matches this exact text.
    Literal(Box<str>),
    /// `*`: exactly one segment.
    Star,
    /// `>`: one or more segments; always last.
    Tail,
}

/// A parsed subscription pattern.
///
/// ```
/// use eventbroker::Pattern;
///
/// let all = Pattern::parse("*")?;
/// assert!(all.matches("public.users.create"));
/// assert!(all.matches("anything"));
///
/// let deletes: Pattern = "*.*.delete".parse()?;
/// assert!(deletes.matches("public.posts.delete"));
/// assert!(!deletes.matches("public.posts"));
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Box<str>,
    segments: Box<[Segment]>,
}

impl Pattern {
    /// Parses `pattern`, or says what is wrong with it and at which byte.
    ///
    /// # Errors
    /// [`PatternError`] for an empty pattern, an empty segment, a wildcard mixed into a segment
    /// (`us*rs`), `>` before the last segment, whitespace, control, format or invisible characters,
    /// or a pattern over [`MAX_NAME_LEN`] bytes or [`MAX_SEGMENTS`] segments.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let mut segments = Vec::with_capacity(4);
        scan(pattern, |offset, segment, is_last| {
            segments.push(match segment {
                "*" => Segment::Star,
                ">" if is_last => Segment::Tail,
                ">" => return Err((offset, SyntaxErrorKind::TailNotLast)),
                literal => {
                    if let Some((i, wildcard)) = literal.char_indices().find(|&(_, c)| is_wildcard(c)) {
                        return Err((offset + i, SyntaxErrorKind::WildcardInSegment { wildcard }));
                    }
                    Segment::Literal(literal.into())
                }
            });
            Ok(())
        })
        .map_err(|(position, kind)| PatternError::new(pattern, position, kind))?;
        Ok(Self { text: pattern.into(), segments: segments.into_boxed_slice() })
    }

    /// The pattern's text, as parsed.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this pattern is exactly `*`, which matches every type.
    pub fn is_match_all(&self) -> bool {
        &*self.text == "*"
    }

    /// Whether `event_type` matches. This is the reference matcher: it walks the one pattern.
    /// For many patterns at once use a [`PatternSet`].
    ///
    /// `event_type` is not validated here; an invalid type simply matches what its text matches.
    pub fn matches(&self, event_type: &str) -> bool {
        if self.is_match_all() {
            return true;
        }
        let mut parts = event_type.split('.');
        for segment in &self.segments {
            match segment {
                Segment::Tail => return parts.next().is_some(),
                Segment::Star => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(literal) => {
                    if parts.next() != Some(&**literal) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.text).finish()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Pattern {
    type Error = PatternError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl AsRef<str> for Pattern {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Checks that `event_type` can be published: the pattern rules, with no wildcards at all.
///
/// ```
/// use eventbroker::validate_event_type;
///
/// assert!(validate_event_type("public.users.create").is_ok());
/// assert!(validate_event_type("public.*.create").is_err());
/// ```
///
/// # Errors
/// [`EventTypeError`] naming the type, the byte, and the broken rule.
pub fn validate_event_type(event_type: &str) -> Result<(), EventTypeError> {
    if is_plain_valid_type(event_type.as_bytes()) {
        return Ok(());
    }
    scan(event_type, |offset, segment, _| match segment.char_indices().find(|&(_, c)| is_wildcard(c)) {
        Some((i, wildcard)) => Err((offset + i, SyntaxErrorKind::WildcardInType { wildcard })),
        None => Ok(()),
    })
    .map_err(|(position, kind)| EventTypeError::new(event_type, position, kind))
}

/// One pass over the bytes, accepting only what is plainly valid: printable ASCII, no wildcard,
/// no empty segment, within the limits. Anything else (non-ASCII included) goes to `scan`, which
/// decides exactly and builds the error. Every publish runs this.
fn is_plain_valid_type(bytes: &[u8]) -> bool {
    if bytes.is_empty() || bytes.len() > MAX_NAME_LEN {
        return false;
    }
    let mut segments = 1;
    let mut previous = b'.';
    for &b in bytes {
        match b {
            b'.' if previous == b'.' => return false,
            b'.' => segments += 1,
            b'*' | b'>' => return false,
            0x21..=0x7e => {}
            _ => return false,
        }
        previous = b;
    }
    previous != b'.' && segments <= MAX_SEGMENTS
}

fn is_wildcard(c: char) -> bool {
    c == '*' || c == '>'
}

/// The characters refused as invisible, in sorted, disjoint, inclusive ranges: the union of
/// `General_Category=Format` (Cf) and `Default_Ignorable_Code_Point`, Unicode 16.0
/// (`extracted/DerivedGeneralCategory.txt` and `DerivedCoreProperties.txt`; regex-syntax's tables
/// give the same, and a test checks the ranges against `\p{Cf}` and
/// `\p{Default_Ignorable_Code_Point}` through it). Zero-width spaces and joiners, the byte-order
/// mark, bidi controls, soft hyphens, variation selectors, Hangul fillers, tag characters, and
/// the code points reserved to be ignorable. Whitespace (with U+2028 and U+2029) and control
/// characters are refused by `char::is_whitespace` and `char::is_control`.
const INVISIBLE: [(char, char); 25] = [
    ('\u{00ad}', '\u{00ad}'),
    ('\u{034f}', '\u{034f}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061c}', '\u{061c}'),
    ('\u{06dd}', '\u{06dd}'),
    ('\u{070f}', '\u{070f}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08e2}', '\u{08e2}'),
    ('\u{115f}', '\u{1160}'),
    ('\u{17b4}', '\u{17b5}'),
    ('\u{180b}', '\u{180f}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{202a}', '\u{202e}'),
    ('\u{2060}', '\u{206f}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{fe00}', '\u{fe0f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{ffa0}', '\u{ffa0}'),
    ('\u{fff0}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0000}', '\u{e0fff}'),
];

/// Whether `c` is in [`INVISIBLE`]. ASCII never is, and costs one comparison.
fn is_invisible(c: char) -> bool {
    c >= INVISIBLE[0].0
        && INVISIBLE
            .binary_search_by(|&(first, last)| {
                if last < c {
                    std::cmp::Ordering::Less
                } else if first > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
}

/// Checks the rules shared by types and patterns and hands each segment, with its byte offset
/// and whether it is the last, to `segment`. Allocates nothing: it runs on every publish.
fn scan(
    input: &str,
    mut segment: impl FnMut(usize, &str, bool) -> Result<(), (usize, SyntaxErrorKind)>,
) -> Result<(), (usize, SyntaxErrorKind)> {
    if input.is_empty() {
        return Err((0, SyntaxErrorKind::Empty));
    }
    if input.len() > MAX_NAME_LEN {
        // The character that crosses the limit, by its first byte: a position always slices.
        let position = (0..=MAX_NAME_LEN).rev().find(|&i| input.is_char_boundary(i)).unwrap_or(0);
        return Err((position, SyntaxErrorKind::TooLong { len: input.len(), max: MAX_NAME_LEN }));
    }
    for (i, ch) in input.char_indices() {
        // ASCII first, and cheaply: its whitespace and control characters are those up to ' ',
        // and DEL; it has no invisible ones.
        let kind = if ch.is_ascii() {
            if ch > ' ' && ch != '\x7f' {
                continue;
            }
            SyntaxErrorKind::InvalidChar { ch }
        } else if ch.is_whitespace() || ch.is_control() {
            SyntaxErrorKind::InvalidChar { ch }
        } else if is_invisible(ch) {
            SyntaxErrorKind::InvisibleChar { ch }
        } else {
            continue;
        };
        return Err((i, kind));
    }
    let count = input.bytes().filter(|&b| b == b'.').count() + 1;
    if count > MAX_SEGMENTS {
        let position = input.match_indices('.').nth(MAX_SEGMENTS - 1).map_or(0, |(i, _)| i + 1);
        return Err((position, SyntaxErrorKind::TooManySegments { count, max: MAX_SEGMENTS }));
    }
    let mut offset = 0;
    for (index, text) in input.split('.').enumerate() {
        if text.is_empty() {
            return Err((offset, SyntaxErrorKind::EmptySegment));
        }
        segment(offset, text, index + 1 == count)?;
        offset += text.len() + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_table_holds() {
        let table = include_str!("../../tests/data/seed_patterns.tsv");
        let mut rows = 0;
        for line in table.lines().skip(1).filter(|l| !l.trim().is_empty()) {
            let cols: Vec<&str> = line.split('\t').collect();
            let [pattern, event_type, expected] = cols[..] else { panic!("bad row {line:?}") };
            let expected: bool = expected.parse().unwrap();
            let p = Pattern::parse(pattern).unwrap();
            assert_eq!(p.matches(event_type), expected, "{pattern} vs {event_type}");
            rows += 1;
        }
        assert_eq!(rows, 22);
    }

    #[test]
    fn tail_matches_one_or_more() {
        let p = Pattern::parse("a.>").unwrap();
        assert!(p.matches("a.b"));
        assert!(p.matches("a.b.c.d"));
        assert!(!p.matches("a"));
        assert!(!p.matches("b.c"));
        assert!(Pattern::parse(">").unwrap().matches("x"));
        assert!(Pattern::parse("*.>").unwrap().matches("x.y"));
        assert!(!Pattern::parse("*.>").unwrap().matches("x"));
    }

    #[test]
    fn matching_is_case_sensitive() {
        assert!(!Pattern::parse("Public.users").unwrap().matches("public.users"));
    }

    fn err(pattern: &str) -> (usize, SyntaxErrorKind) {
        let e = Pattern::parse(pattern).unwrap_err();
        assert_eq!(e.pattern(), pattern);
        (e.position(), e.kind().clone())
    }

    #[test]
    fn every_invalid_form_is_typed_with_its_position() {
        use SyntaxErrorKind as K;
        assert_eq!(err(""), (0, K::Empty));
        assert_eq!(err("a..b"), (2, K::EmptySegment));
        assert_eq!(err(".a"), (0, K::EmptySegment));
        assert_eq!(err("a."), (2, K::EmptySegment));
        assert_eq!(err("a.>.b"), (2, K::TailNotLast));
        assert_eq!(err("us*rs"), (2, K::WildcardInSegment { wildcard: '*' }));
        assert_eq!(err("a.b>"), (3, K::WildcardInSegment { wildcard: '>' }));
        assert_eq!(err("a.**"), (2, K::WildcardInSegment { wildcard: '*' }));
        assert_eq!(err("a b"), (1, K::InvalidChar { ch: ' ' }));
        assert_eq!(err("a.\u{7}"), (2, K::InvalidChar { ch: '\u{7}' }));
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(err(&long), (MAX_NAME_LEN, K::TooLong { len: MAX_NAME_LEN + 1, max: MAX_NAME_LEN }));
        let many = vec!["s"; MAX_SEGMENTS + 2].join(".");
        assert_eq!(
            err(&many),
            (2 * MAX_SEGMENTS, K::TooManySegments { count: MAX_SEGMENTS + 2, max: MAX_SEGMENTS })
        );
    }

    #[test]
    fn invisible_characters_are_refused_where_they_are() {
        use SyntaxErrorKind as K;
        assert_eq!(err("a\u{200b}b"), (1, K::InvisibleChar { ch: '\u{200b}' }));
        assert_eq!(err("\u{feff}public.*"), (0, K::InvisibleChar { ch: '\u{feff}' }));
        assert_eq!(err("é.x\u{2060}"), (4, K::InvisibleChar { ch: '\u{2060}' }));
        assert_eq!(err("a.\u{3164}"), (2, K::InvisibleChar { ch: '\u{3164}' }), "a Hangul filler");
        assert_eq!(
            err("a\u{2028}b"),
            (1, K::InvalidChar { ch: '\u{2028}' }),
            "a line separator is whitespace"
        );
        let e = validate_event_type("public.users\u{200b}.create").unwrap_err();
        assert_eq!((e.position(), e.kind()), (12, &K::InvisibleChar { ch: '\u{200b}' }));
        assert_eq!(
            e.to_string(),
            "invalid event type \"public.users\\u{200b}.create\" at byte 12: \
             invisible or format character U+200B is not allowed"
        );
        let e = Pattern::parse("audit.\u{e0041}").unwrap_err();
        assert!(e.to_string().ends_with("character U+E0041 is not allowed"), "{e}");
    }

    #[test]
    fn the_ascii_shortcut_refuses_exactly_whitespace_and_control() {
        for ch in (0..0x80u8).map(char::from) {
            let refused = Pattern::parse(&format!("a{ch}")).is_err_and(|e| e.position() == 1);
            assert_eq!(
                refused && !matches!(ch, '.' | '*' | '>'),
                ch.is_whitespace() || ch.is_control(),
                "{ch:?}"
            );
        }
    }

    #[test]
    fn the_invisible_table_is_sorted_and_its_edges_are_exact() {
        assert!(INVISIBLE.iter().all(|&(first, last)| first <= last));
        assert!(
            INVISIBLE.windows(2).all(|w| u32::from(w[0].1) + 1 < u32::from(w[1].0)),
            "disjoint, not adjacent"
        );
        for &(first, last) in &INVISIBLE {
            for ch in [first, last] {
                let e = validate_event_type(&format!("a.b{ch}")).unwrap_err();
                assert_eq!((e.position(), e.kind()), (3, &SyntaxErrorKind::InvisibleChar { ch }));
            }
            let beside = [u32::from(first) - 1, u32::from(last) + 1].map(|c| char::from_u32(c).unwrap());
            for ch in beside.into_iter().filter(|c| !c.is_whitespace() && !c.is_control()) {
                assert!(validate_event_type(&format!("a.b{ch}")).is_ok(), "U+{:04X}", u32::from(ch));
            }
        }
    }

    #[test]
    fn a_too_long_input_is_blamed_on_a_character_boundary() {
        // Found by `fuzz/fuzz_targets/parse.rs`: byte 255 fell inside the 128th 'é'.
        let long = "é".repeat(130);
        let kind = SyntaxErrorKind::TooLong { len: 260, max: MAX_NAME_LEN };
        assert_eq!(err(&long), (254, kind.clone()));
        let e = validate_event_type(&long).unwrap_err();
        assert_eq!((e.position(), e.kind()), (254, &kind));
        assert!(long.is_char_boundary(e.position()));
    }

    #[test]
    fn limits_are_inclusive() {
        assert!(Pattern::parse(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(Pattern::parse(&vec!["s"; MAX_SEGMENTS].join(".")).is_ok());
        assert!(validate_event_type(&vec!["s"; MAX_SEGMENTS].join(".")).is_ok());
    }

    #[test]
    fn event_types_reject_wildcards_anywhere() {
        let e = validate_event_type("public.*.create").unwrap_err();
        assert_eq!((e.position(), e.kind()), (7, &SyntaxErrorKind::WildcardInType { wildcard: '*' }));
        let e = validate_event_type("a.b>c").unwrap_err();
        assert_eq!(e.position(), 3);
        assert!(validate_event_type("").is_err());
        assert!(validate_event_type("ünïcode.é").is_ok());
    }

    #[test]
    fn error_messages_name_the_numbers() {
        let many = vec!["s"; 40].join(".");
        assert_eq!(
            Pattern::parse(&many).unwrap_err().to_string(),
            format!("invalid pattern {many:?} at byte 64: it has 40 segments; the limit is 32")
        );
    }

    proptest::proptest! {
        /// The one-pass check accepts only what the exact scanner accepts, and together they
        /// give the scanner's verdict on everything.
        #[test]
        fn the_fast_type_check_agrees_with_the_scanner(input in "[a.*> é\\t\\x7f]{0,40}|[a-z.]{250,260}") {
            let exact = scan(&input, |offset, segment, _| {
                match segment.char_indices().find(|&(_, c)| is_wildcard(c)) {
                    Some((i, wildcard)) => Err((offset + i, SyntaxErrorKind::WildcardInType { wildcard })),
                    None => Ok(()),
                }
            });
            if is_plain_valid_type(input.as_bytes()) {
                proptest::prop_assert!(exact.is_ok(), "{input:?}");
            }
            proptest::prop_assert_eq!(validate_event_type(&input).is_ok(), exact.is_ok());
        }
    }

    proptest::proptest! {
        /// The table against regex-syntax's Unicode tables (the version proptest builds with),
        /// sampled from both sides.
        #[test]
        fn the_invisible_table_is_unicode_format_and_default_ignorable(
            refused in proptest::string::string_regex(r"[\p{Cf}\p{Default_Ignorable_Code_Point}]").unwrap(),
            kept in proptest::string::string_regex(r"[^\p{Cf}\p{Default_Ignorable_Code_Point}]").unwrap(),
        ) {
            let (refused, kept) = (refused.chars().next().unwrap(), kept.chars().next().unwrap());
            proptest::prop_assert!(is_invisible(refused), "U+{:04X}", u32::from(refused));
            proptest::prop_assert!(!is_invisible(kept), "U+{:04X}", u32::from(kept));
        }
    }

    #[test]
    fn serde_round_trip_validates() {
        let p: Pattern = serde_json::from_str("\"a.*.>\"").unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"a.*.>\"");
        assert!(serde_json::from_str::<Pattern>("\"a..b\"").is_err());
    }
}
