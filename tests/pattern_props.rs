//! `PatternSet` and `MatchCache` against the reference matcher, `Pattern::matches`, on random
//! pattern sets, types and insert/remove interleavings; and the character rule that keeps two
//! names that look alike from being different keys.

use eventbroker::{EntryId, MatchCache, Pattern, PatternSet, validate_event_type};
use proptest::prelude::*;

/// Literals come mostly from a tiny alphabet so that random patterns and types actually meet,
/// sometimes from a wider one so that nodes get more than `INLINE_LITERALS` (8) literal children
/// and switch to a hash map.
fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop_oneof![Just("a"), Just("b"), Just("c"), Just("dd")].prop_map(str::to_owned),
        3 => (0..12u8).prop_map(|i| format!("m{i}")),
    ]
}

fn pattern() -> impl Strategy<Value = Pattern> {
    let segment = prop_oneof![4 => literal(), 2 => Just("*".to_owned())];
    let general = (prop::collection::vec(segment, 1..=4), any::<bool>()).prop_map(|(mut segments, tail)| {
        if tail {
            ">".clone_into(segments.last_mut().expect("at least one"));
        }
        segments.join(".")
    });
    prop_oneof![12 => general, 1 => Just("*".to_owned())]
        .prop_map(|text| Pattern::parse(&text).expect("generated patterns are valid"))
}

fn event_type() -> impl Strategy<Value = String> {
    prop::collection::vec(prop_oneof![4 => literal(), 1 => Just("e".to_owned())], 1..=5)
        .prop_map(|segments| segments.join("."))
}

#[derive(Debug, Clone)]
enum Op {
    Insert(Pattern),
    /// Removes the live entry at this index (modulo the count), if any.
    Remove(usize),
    /// Removes an entry under a pattern it was not inserted with: must change nothing.
    RemoveWrong(usize, Pattern),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => pattern().prop_map(Op::Insert),
        3 => any::<usize>().prop_map(Op::Remove),
        1 => (any::<usize>(), pattern()).prop_map(|(i, p)| Op::RemoveWrong(i, p)),
    ]
}

/// The naive model: every live entry, in id order.
type Model = Vec<(EntryId, Pattern, u32)>;

fn expected(model: &Model, event_type: &str) -> Vec<(EntryId, u32)> {
    model.iter().filter(|(_, p, _)| p.matches(event_type)).map(|&(id, _, v)| (id, v)).collect()
}

fn actual(set: &PatternSet<u32>, event_type: &str) -> Vec<(EntryId, u32)> {
    set.matches(event_type).iter().map(|&(id, &v)| (id, v)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_built_set_matches_like_the_reference(
        patterns in prop::collection::vec(pattern(), 0..40),
        types in prop::collection::vec(event_type(), 1..30),
    ) {
        let mut set = PatternSet::new();
        let model: Model = patterns.iter().zip(0..).map(|(p, v)| (set.insert(p, v), p.clone(), v)).collect();
        let collected: PatternSet<u32> = patterns.iter().cloned().zip(0..).collect();
        let mut cache = MatchCache::new(8);
        for t in types.iter().chain(&types) {
            let want = expected(&model, t);
            prop_assert_eq!(actual(&set, t), want.clone(), "type {}", t);
            prop_assert_eq!(actual(&collected, t), want.clone(), "collected, type {}", t);
            prop_assert_eq!(set.is_match(t), !want.is_empty());
            let values: Vec<u32> = want.iter().map(|&(_, v)| v).collect();
            prop_assert_eq!(cache.get_or_match(&set, t), &values[..], "cached, type {}", t);
        }
    }

    #[test]
    fn interleaved_inserts_and_removes_keep_every_snapshot_right(
        ops in prop::collection::vec(op(), 1..60),
        types in prop::collection::vec(event_type(), 1..12),
    ) {
        let mut set = PatternSet::new();
        let mut model: Model = Vec::new();
        let mut snapshots = Vec::new();
        // One cache across every version, small enough to overflow.
        let mut cache = MatchCache::new(4);
        for (value, op) in (0..).zip(ops) {
            let generation = set.generation();
            match op {
                Op::Insert(pattern) => {
                    let id = set.insert(&pattern, value);
                    prop_assert!(model.last().is_none_or(|&(last, _, _)| last < id));
                    model.push((id, pattern, value));
                }
                Op::Remove(i) if !model.is_empty() => {
                    let (id, pattern, v) = model.remove(i % model.len());
                    prop_assert_eq!(set.remove(&pattern, id), Some(v));
                    prop_assert!(!set.contains(&pattern, id));
                }
                Op::Remove(_) => {}
                Op::RemoveWrong(i, pattern) => {
                    if let Some((id, right, _)) = (!model.is_empty()).then(|| &model[i % model.len()]) {
                        if pattern != *right {
                            prop_assert_eq!(set.remove(&pattern, *id), None);
                            prop_assert_eq!(set.generation(), generation);
                        }
                    }
                }
            }
            prop_assert_eq!(set.len(), model.len());
            for t in &types {
                let want = expected(&model, t);
                prop_assert_eq!(actual(&set, t), want.clone(), "type {}", t);
                let values: Vec<u32> = want.iter().map(|&(_, v)| v).collect();
                prop_assert_eq!(cache.get_or_match(&set, t), &values[..], "cached, type {}", t);
            }
            snapshots.push((set.clone(), model.clone()));
        }
        // Later changes copied paths instead of touching what older snapshots share.
        for (snapshot, model) in &snapshots {
            prop_assert_eq!(snapshot.len(), model.len());
            for t in &types {
                prop_assert_eq!(actual(snapshot, t), expected(model, t), "snapshot, type {}", t);
            }
        }
    }
}

#[test]
fn every_seed_row_holds_in_one_set() {
    let table = include_str!("data/seed_patterns.tsv");
    let rows: Vec<[&str; 3]> = table
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').collect::<Vec<_>>().try_into().expect("three columns"))
        .collect();
    assert_eq!(rows.len(), 22);
    // Every row's pattern in one set, duplicates included, each entry's value its row.
    let set: PatternSet<usize> =
        rows.iter().enumerate().map(|(i, r)| (Pattern::parse(r[0]).unwrap(), i)).collect();
    let mut cache = MatchCache::new(64);
    for (i, [pattern, event_type, expected]) in rows.iter().enumerate() {
        let hits: Vec<usize> = set.matches(event_type).values().copied().collect();
        assert_eq!(hits.contains(&i), *expected == "true", "{pattern} vs {event_type}");
        assert_eq!(cache.get_or_match(&set, event_type), &hits[..]);
        // And the set agrees with the reference on every other row's pattern too.
        let reference: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| Pattern::parse(r[0]).unwrap().matches(event_type))
            .map(|(j, _)| j)
            .collect();
        assert_eq!(hits, reference, "{event_type}");
    }
}

/// Two subscriptions that print the same must be the same: a zero-width space or a byte-order mark
/// is refused, in a type and in a pattern, at the byte where it starts.
#[test]
fn names_that_look_alike_are_alike() {
    for (name, position) in
        [("orders.created\u{200b}", 14), ("\u{feff}orders.created", 0), ("orders.cr\u{ad}eated", 9)]
    {
        let e = validate_event_type(name).expect_err(name);
        assert_eq!(e.position(), position, "{e}");
        let e = Pattern::parse(name).expect_err(name);
        assert_eq!(e.position(), position, "{e}");
        assert!(
            e.to_string().contains(&format!("U+{:04X}", u32::from(name[position..].chars().next().unwrap()))),
            "{e}"
        );
    }
    let e = Pattern::parse("orders.\u{2060}*").unwrap_err();
    assert_eq!(e.position(), 7);
}
