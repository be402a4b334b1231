//! Differential: a `PatternSet` built by random inserts and removes, and a `MatchCache` in front
//! of it, against a naive list of every live entry tested with `Pattern::matches`, in order.
//! Every earlier snapshot of the set must keep answering as it did (path copying).

#![no_main]

use arbitrary::Arbitrary;
use eventbroker::{EntryId, MAX_SEGMENTS, MatchCache, Pattern, PatternSet};
use libfuzzer_sys::fuzz_target;

/// A small alphabet, so that random patterns and types meet, yet more than `INLINE_LITERALS` (8)
/// of them, so that nodes also switch their literal edges to a hash map.
const LITERALS: [&str; 12] = ["a", "b", "c", "dd", "é", "a_b", "m0", "m1", "m2", "m3", "m4", "m5"];

#[derive(Debug, Arbitrary)]
enum SegmentSpec {
    Literal(u8),
    Star,
}

#[derive(Debug, Arbitrary)]
struct PatternSpec {
    segments: Vec<SegmentSpec>,
    tail: bool,
    match_all: bool,
}

impl PatternSpec {
    fn build(&self) -> Pattern {
        let text = if self.match_all {
            "*".to_owned()
        } else {
            let mut segments: Vec<&str> = self
                .segments
                .iter()
                .take(MAX_SEGMENTS)
                .map(|s| match s {
                    SegmentSpec::Literal(i) => LITERALS[usize::from(*i) % LITERALS.len()],
                    SegmentSpec::Star => "*",
                })
                .collect();
            if segments.is_empty() {
                segments.push("a");
            }
            if self.tail {
                *segments.last_mut().expect("not empty") = ">";
            }
            segments.join(".")
        };
        Pattern::parse(&text).expect("specs build valid patterns")
    }
}

#[derive(Debug, Arbitrary)]
enum TypeSpec {
    /// Segments from the alphabet: valid types, most of which meet some pattern.
    Segments(Vec<u8>),
    /// Any text at all, valid or not: the set must still agree with the reference.
    Raw(String),
}

impl TypeSpec {
    fn build(&self) -> String {
        match self {
            Self::Segments(segments) if segments.is_empty() => "a".to_owned(),
            Self::Segments(segments) => segments
                .iter()
                .take(MAX_SEGMENTS + 2)
                .map(|&i| LITERALS[usize::from(i) % LITERALS.len()])
                .collect::<Vec<_>>()
                .join("."),
            Self::Raw(text) => text.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    Insert(PatternSpec),
    /// Removes the live entry at this index, modulo the count.
    Remove(u16),
    /// Tries to remove a live entry under some other pattern: must change nothing.
    RemoveWrong(u16, PatternSpec),
}

#[derive(Debug, Arbitrary)]
struct Input {
    ops: Vec<Op>,
    types: Vec<TypeSpec>,
    cache_capacity: u8,
}

type Model = Vec<(EntryId, Pattern, u32)>;

fn reference(model: &Model, event_type: &str) -> Vec<(EntryId, u32)> {
    model.iter().filter(|(_, p, _)| p.matches(event_type)).map(|&(id, _, v)| (id, v)).collect()
}

fn check(set: &PatternSet<u32>, model: &Model, types: &[String], cache: &mut MatchCache<u32>) {
    assert_eq!(set.len(), model.len());
    for t in types {
        let expected = reference(model, t);
        let actual: Vec<(EntryId, u32)> = set.matches(t).iter().map(|&(id, &v)| (id, v)).collect();
        assert_eq!(actual, expected, "type {t:?}");
        assert_eq!(set.is_match(t), !expected.is_empty(), "type {t:?}");
        let values: Vec<u32> = expected.iter().map(|&(_, v)| v).collect();
        assert_eq!(cache.get_or_match(set, t), values, "cached, type {t:?}");
    }
}

fuzz_target!(|input: Input| {
    let types: Vec<String> = input.types.iter().take(16).map(TypeSpec::build).collect();
    let mut cache = MatchCache::new(usize::from(input.cache_capacity));
    let mut set = PatternSet::new();
    let mut model = Model::new();
    let mut snapshots = Vec::new();
    for (value, op) in (0..).zip(input.ops.iter().take(64)) {
        let generation = set.generation();
        match op {
            Op::Insert(spec) => {
                let pattern = spec.build();
                let id = set.insert(&pattern, value);
                assert!(model.last().is_none_or(|&(last, _, _)| last < id), "ids increase");
                assert_ne!(set.generation(), generation);
                model.push((id, pattern, value));
            }
            Op::Remove(i) => {
                if !model.is_empty() {
                    let (id, pattern, v) = model.remove(usize::from(*i) % model.len());
                    assert_eq!(set.remove(&pattern, id), Some(v));
                    assert!(!set.contains(&pattern, id));
                    assert_ne!(set.generation(), generation);
                }
            }
            Op::RemoveWrong(i, spec) => {
                if !model.is_empty() {
                    let (id, right, _) = &model[usize::from(*i) % model.len()];
                    let pattern = spec.build();
                    if pattern != *right {
                        assert_eq!(set.remove(&pattern, *id), None);
                        assert_eq!(set.generation(), generation);
                    }
                }
            }
        }
        check(&set, &model, &types, &mut cache);
        snapshots.push((set.clone(), model.clone()));
    }
    for (snapshot, model) in &snapshots {
        check(snapshot, model, &types, &mut cache);
    }
});
