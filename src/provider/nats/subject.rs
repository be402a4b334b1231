//! Event types as NATS subjects, and subscription patterns as consumer filter subjects.
//!
//! An event of type `a.b.c` is stored on subject `<prefix>.a.b.c`: one subject token per type
//! segment. A segment made only of the characters NATS recommends for subject tokens (ASCII
//! letters, digits, `-`, `_`) is used as it is; any other byte, and `%` itself, is written as `%XX`
//! (two upper-case hex digits), so `café.paid` becomes `caf%C3%A9.paid` and the encoding is
//! reversible and injective token by token. A valid event type never contains a control character,
//! so the token `%00` never names a type: it is the filter that matches nothing.
//!
//! A pattern becomes a filter subject segment by segment: a literal is encoded like a type segment,
//! `*` stays `*`, a trailing `>` stays `>`, and the pattern that is exactly `*` (every type, the
//! seed's rule) becomes `<prefix>.>`. Because the encoding is per token, the filter matches a
//! subject exactly when the pattern matches its type.
//!
//! A consumer on a 2.9 server has one filter subject, so several patterns are folded into the
//! narrowest subject that covers them all ([`cover`]): `billing.>` and `billing.paid` give
//! `billing.>`; `billing.>` and `users.created` give `*.>`. On 2.10 and later a consumer takes a
//! list of filters that must not overlap ([`disjoint_cover`]). Either way the source checks the
//! exact patterns again after fetching, so a wider filter costs bandwidth, never correctness.

use std::fmt::Write as _;

use crate::pattern::{Pattern, Segment};

/// The token that no encoded event type segment ever equals: `%00` would be a NUL byte.
const NOTHING: &str = "%00";

/// Whether `byte` is kept as it is in a subject token.
const fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// Appends `segment`, encoded as one subject token, to `out`.
fn encode_token(segment: &str, out: &mut String) {
    if segment.bytes().all(is_plain) {
        out.push_str(segment);
        return;
    }
    for byte in segment.bytes() {
        if is_plain(byte) {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// The subject an event of `event_type` is stored on.
pub(super) fn event_subject(prefix: &str, event_type: &str) -> String {
    let mut subject = String::with_capacity(prefix.len() + 1 + event_type.len());
    subject.push_str(prefix);
    for segment in event_type.split('.') {
        subject.push('.');
        encode_token(segment, &mut subject);
    }
    subject
}

/// The event type stored on `subject`, or `None` when the subject is not under `prefix` or a
/// token is not a valid encoding.
pub(super) fn event_type_of(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut bytes = Vec::with_capacity(rest.len());
    let mut input = rest.bytes();
    while let Some(byte) = input.next() {
        if byte == b'%' {
            let hex = [input.next()?, input.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            bytes.push(byte);
        }
    }
    String::from_utf8(bytes).ok()
}

/// One token of a filter subject, below the prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Token {
    /// An encoded literal token.
    Literal(String),
    /// `*`.
    Star,
    /// `>`, always last.
    Tail,
}

/// A filter subject below the prefix, as tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Filter(Vec<Token>);

impl Filter {
    /// Every event: `<prefix>.>`.
    pub(super) fn all() -> Self {
        Self(vec![Token::Tail])
    }

    /// The filter of one pattern.
    pub(super) fn of(pattern: &Pattern) -> Self {
        if pattern.is_match_all() {
            return Self::all();
        }
        Self(
            pattern
                .segments()
                .iter()
                .map(|segment| match segment {
                    Segment::Literal(text) => {
                        let mut token = String::with_capacity(text.len());
                        encode_token(text, &mut token);
                        Token::Literal(token)
                    }
                    Segment::Star => Token::Star,
                    Segment::Tail => Token::Tail,
                })
                .collect(),
        )
    }

    /// The full filter subject under `prefix`.
    pub(super) fn subject(&self, prefix: &str) -> String {
        let mut subject = String::from(prefix);
        for token in &self.0 {
            subject.push('.');
            subject.push_str(match token {
                Token::Literal(text) => text,
                Token::Star => "*",
                Token::Tail => ">",
            });
        }
        subject
    }

    /// Fewest tokens a subject it matches has.
    fn min_tokens(&self) -> usize {
        self.0.len()
    }

    fn has_tail(&self) -> bool {
        self.0.last() == Some(&Token::Tail)
    }

    /// The narrowest filter of this shape that matches everything `self` or `other` matches.
    fn join(&self, other: &Self) -> Self {
        if !self.has_tail() && !other.has_tail() && self.0.len() == other.0.len() {
            return Self(self.0.iter().zip(&other.0).map(|(a, b)| merge(a, b)).collect());
        }
        // Every subject either matches has at least `fewest` tokens: the first `fewest - 1` are
        // merged, `>` takes the rest (at least one).
        let fewest = self.min_tokens().min(other.min_tokens());
        let mut tokens: Vec<Token> =
            self.0.iter().zip(&other.0).take(fewest - 1).map(|(a, b)| merge(a, b)).collect();
        tokens.push(Token::Tail);
        Self(tokens)
    }

    /// Whether every subject `other` matches is matched by `self`.
    fn covers(&self, other: &Self) -> bool {
        for (i, token) in self.0.iter().enumerate() {
            match (token, other.0.get(i)) {
                (Token::Tail, Some(_)) => return true,
                (_, None | Some(Token::Tail)) => return false,
                (Token::Star, Some(_)) => {}
                (Token::Literal(a), Some(Token::Literal(b))) if a == b => {}
                (Token::Literal(_), Some(_)) => return false,
            }
        }
        self.0.len() == other.0.len()
    }

    /// Whether some subject matches both.
    fn overlaps(&self, other: &Self) -> bool {
        for i in 0.. {
            match (self.0.get(i), other.0.get(i)) {
                (None, None) | (Some(Token::Tail), Some(_)) | (Some(_), Some(Token::Tail)) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(Token::Literal(a)), Some(Token::Literal(b))) if a != b => return false,
                (Some(_), Some(_)) => {}
            }
        }
        unreachable!("the loop returns once either filter runs out of tokens")
    }
}

fn merge(a: &Token, b: &Token) -> Token {
    match (a, b) {
        (Token::Literal(x), Token::Literal(y)) if x == y => a.clone(),
        _ => Token::Star,
    }
}

/// The filter subjects for `patterns` on a server that takes one: the narrowest single subject
/// that covers every pattern, or the subject that matches nothing when `patterns` is empty.
pub(super) fn cover(prefix: &str, patterns: &[Pattern]) -> String {
    let mut filters = patterns.iter().map(Filter::of);
    let Some(first) = filters.next() else {
        return format!("{prefix}.{NOTHING}");
    };
    filters.fold(first, |acc, next| acc.join(&next)).subject(prefix)
}

/// The filter subjects for `patterns` on a server that takes a list (2.10 and later): pairwise
/// non-overlapping, as the server requires, covering every pattern; patterns that overlap are
/// joined. Empty `patterns` give the one subject that matches nothing.
pub(super) fn disjoint_cover(prefix: &str, patterns: &[Pattern]) -> Vec<String> {
    let mut filters: Vec<Filter> = Vec::new();
    for pattern in patterns {
        let mut next = Filter::of(pattern);
        // Absorb every filter the newcomer overlaps, widening it each time, until it overlaps none.
        while let Some(at) = filters.iter().position(|f| f.overlaps(&next)) {
            let old = filters.swap_remove(at);
            next = if old.covers(&next) {
                old
            } else if next.covers(&old) {
                next
            } else {
                old.join(&next)
            };
        }
        filters.push(next);
    }
    if filters.is_empty() {
        return vec![format!("{prefix}.{NOTHING}")];
    }
    let mut subjects: Vec<String> = filters.iter().map(|f| f.subject(prefix)).collect();
    subjects.sort();
    subjects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Vec<Pattern> {
        list.iter().map(|p| Pattern::parse(p).expect("a valid pattern")).collect()
    }

    #[test]
    fn plain_types_keep_their_text() {
        assert_eq!(event_subject("events", "public.users.create"), "events.public.users.create");
        assert_eq!(event_subject("acme.ev", "a-b.c_d.E9"), "acme.ev.a-b.c_d.E9");
    }

    #[test]
    fn other_bytes_are_escaped_reversibly() {
        for ty in ["café.paid", "100%.done", "a$b.~c", "user@host.x:y", "%00.x", "日本.語", "a/b.c\\d"] {
            let subject = event_subject("events", ty);
            let tokens: Vec<&str> = subject.split('.').skip(1).collect();
            assert_eq!(tokens.len(), ty.split('.').count(), "{ty}: one token per segment");
            assert!(tokens.iter().all(|t| t.bytes().all(|b| is_plain(b) || b == b'%')), "{ty} -> {subject}");
            assert_eq!(event_type_of("events", &subject).as_deref(), Some(ty), "{subject}");
        }
        assert_eq!(event_subject("events", "café"), "events.caf%C3%A9");
        assert_eq!(event_subject("events", "100%"), "events.100%25");
        assert_ne!(event_subject("events", "%00"), format!("events.{NOTHING}"));
        assert_eq!(event_type_of("events", "other.x"), None);
        assert_eq!(event_type_of("events", "events.bad%zz"), None);
    }

    #[test]
    fn patterns_become_filters_token_for_token() {
        let subject = |p: &str| Filter::of(&Pattern::parse(p).expect("valid")).subject("events");
        assert_eq!(subject("billing.>"), "events.billing.>");
        assert_eq!(subject("*.users.*"), "events.*.users.*");
        assert_eq!(subject("*"), "events.>", "a lone * matches every type");
        assert_eq!(subject("café.*"), "events.caf%C3%A9.*");
        assert_eq!(subject("a.*.>"), "events.a.*.>");
    }

    #[test]
    fn one_subject_covers_several_patterns() {
        let cover = |list: &[&str]| cover("events", &patterns(list));
        assert_eq!(cover(&["billing.>"]), "events.billing.>");
        assert_eq!(cover(&["billing.>", "billing.paid"]), "events.billing.>");
        assert_eq!(cover(&["billing.paid", "billing.refunded"]), "events.billing.*");
        assert_eq!(cover(&["billing.>", "users.created"]), "events.*.>");
        assert_eq!(cover(&["a.b", "a.b.c"]), "events.a.>");
        assert_eq!(cover(&["a", "b.c"]), "events.>");
        assert_eq!(cover(&["a.*.c", "a.b.*"]), "events.a.*.*");
        assert_eq!(cover(&["*", "billing.paid"]), "events.>");
        assert_eq!(cover(&[]), "events.%00");
    }

    #[test]
    fn disjoint_covers_do_not_overlap_and_cover_everything() {
        let disjoint = |list: &[&str]| disjoint_cover("events", &patterns(list));
        assert_eq!(disjoint(&["billing.>", "users.created"]), ["events.billing.>", "events.users.created"]);
        assert_eq!(disjoint(&["billing.>", "billing.paid"]), ["events.billing.>"]);
        assert_eq!(disjoint(&["billing.paid", "billing.paid"]), ["events.billing.paid"]);
        assert_eq!(disjoint(&["a.*.c", "a.b.*", "x.y"]), ["events.a.*.*", "events.x.y"]);
        assert_eq!(disjoint(&["a.b", "a.>"]), ["events.a.>"]);
        assert_eq!(disjoint(&[]), ["events.%00"]);
        assert_eq!(disjoint(&["*", "a.b"]), ["events.>"]);
    }

    #[test]
    fn overlap_and_cover_agree_with_a_brute_force_over_small_subjects() {
        let alphabet = ["a", "b"];
        let mut subjects: Vec<String> = Vec::new();
        // One token longer than the longest pattern, so a tail always shows it reaches further.
        for len in 1..=4_u32 {
            for n in 0..2_usize.pow(len) {
                let tokens: Vec<&str> = (0..len).map(|i| alphabet[(n >> i) & 1]).collect();
                subjects.push(tokens.join("."));
            }
        }
        let list = ["a", "b", "*", "a.b", "*.b", "a.*", "a.>", "*.>", "a.*.b", "b.>", "*.*.*", "a.b.>"];
        let filters = patterns(&list);
        for (p, fp) in filters.iter().zip(filters.iter().map(Filter::of)) {
            for (q, fq) in filters.iter().zip(filters.iter().map(Filter::of)) {
                let both = subjects.iter().any(|s| p.matches(s) && q.matches(s));
                let superset = subjects.iter().all(|s| !q.matches(s) || p.matches(s));
                assert_eq!(fp.overlaps(&fq), both, "{p} overlaps {q}");
                // `*` as a whole pattern means every type, which no bounded alphabet disproves.
                if !p.is_match_all() && !q.is_match_all() {
                    assert_eq!(fp.covers(&fq), superset, "{p} covers {q}");
                }
                let joined = fp.join(&fq);
                assert!(joined.covers(&fp) && joined.covers(&fq), "{p} ∨ {q} = {joined:?}");
            }
        }
    }
}
