//! Matching cost against the number of subscriptions: the compiled trie cold, through a warm
//! cache, through a cache that holds a tenth of the types in play, and the baseline that tests
//! every pattern in turn (what the Go seed does).
//!
//! `cargo bench --bench matching` runs in about a minute and a half; CI runs it once through with
//! `cargo bench --bench matching -- --test`.
//!
//! The entries are a realistic, deterministic mix (see [`Mix`]) whose density is the same at every
//! size, so a queried type matches about the same number of entries (5.5 on average) at a thousand
//! as at a million: what grows is only the haystack. Values are `u64`s, as a broker would store
//! subscription ids.

use std::collections::HashSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use eventbroker::{MatchCache, Pattern, PatternSet};

const SIZES: [usize; 4] = [10, 1_000, 100_000, 1_000_000];
/// The baseline tests every pattern for every type: at 1M entries one pass over the query mix
/// takes seconds, so it stops at 100k.
const BASELINE_MAX: usize = 100_000;
/// Distinct types in the fixed query mix.
const QUERIES: usize = 256;
/// The cache of the hit and overflow groups.
const CACHE_CAPACITY: usize = 1024;
/// Distinct types of the overflow group: ten times the cache.
const OVERFLOW_TYPES: usize = 10 * CACHE_CAPACITY;
/// Lookups per iteration of the overflow group, drawn uniformly from `OVERFLOW_TYPES`.
const OVERFLOW_LOOKUPS: usize = 16_384;

const OPS: [&str; 4] = ["create", "update", "delete", "read"];
const ENTITIES: u64 = 16;

/// splitmix64: a fixed-seed generator, so every run benches the same sets and types.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn op(&mut self) -> &'static str {
        OPS[usize::try_from(self.below(4)).expect("small")]
    }
}

/// The shape of a subscription population of `size` entries: `size / 64` schemas of 16 entities
/// with 4 operations, so there are about as many `schema.entity.op` types as entries.
struct Mix {
    schemas: u64,
}

impl Mix {
    fn new(size: usize) -> Self {
        Self { schemas: (size as u64 / 64).max(1) }
    }

    /// Five fixed catch-alls (two `*`, `*.*.create`, `>`, `*.>`), then 85% literal `s.e.op`,
    /// 7% `s.*.op`, 4% `s.e.*`, 4% `s.e.>`.
    fn patterns(&self, size: usize) -> Vec<Pattern> {
        let mut rng = Rng(size as u64);
        let fixed = ["*", "*", "*.*.create", ">", "*.>"];
        let mut texts: Vec<String> = fixed.iter().take(size).map(|&s| s.to_owned()).collect();
        while texts.len() < size {
            let (s, e, op) = (rng.below(self.schemas), rng.below(ENTITIES), rng.op());
            texts.push(match rng.below(100) {
                0..85 => format!("s{s}.e{e}.{op}"),
                85..92 => format!("s{s}.*.{op}"),
                92..96 => format!("s{s}.e{e}.*"),
                _ => format!("s{s}.e{e}.>"),
            });
        }
        texts.iter().map(|t| Pattern::parse(t).expect("valid")).collect()
    }

    /// Types to query: 60% existing `s.e.op`, 20% unknown schemas (only the catch-alls match),
    /// 10% two segments, 10% four.
    fn types(&self, count: usize, seed: u64) -> Vec<String> {
        let mut rng = Rng(seed);
        (0..count)
            .map(|_| {
                let (s, e, op) = (rng.below(self.schemas), rng.below(ENTITIES), rng.op());
                match rng.below(10) {
                    0..6 => format!("s{s}.e{e}.{op}"),
                    6..8 => format!("x{s}.e{e}.{op}"),
                    8 => format!("s{s}.e{e}"),
                    _ => format!("s{s}.e{e}.{op}.extra"),
                }
            })
            .collect()
    }

    /// `count` distinct types of the query mix; where the mix has too few (small sizes), the rest
    /// are unknown schemas that only the catch-alls match.
    fn distinct_types(&self, count: usize, seed: u64) -> Vec<String> {
        let mut unique = HashSet::new();
        let mut types: Vec<String> =
            self.types(count, seed).into_iter().filter(|t| unique.insert(t.clone())).collect();
        types.extend((0..).map(|i| format!("unknown{i}.e.create")).take(count - types.len()));
        types
    }
}

struct Fixture {
    size: usize,
    set: PatternSet<u64>,
    /// The seed's way: every pattern, tested in turn. Only up to `BASELINE_MAX`.
    list: Option<Vec<(Pattern, u64)>>,
    queries: Vec<String>,
    overflow_lookups: Vec<String>,
}

impl Fixture {
    fn new(size: usize) -> Self {
        let mix = Mix::new(size);
        let patterns = mix.patterns(size);
        let started = Instant::now();
        let set: PatternSet<u64> = patterns.iter().cloned().zip(0..).collect();
        let built = started.elapsed();
        let list = (size <= BASELINE_MAX).then(|| patterns.into_iter().zip(0..).collect());
        let queries = mix.types(QUERIES, 7);
        let pool = mix.distinct_types(OVERFLOW_TYPES, 11);
        let mut rng = Rng(13);
        let overflow_lookups = (0..OVERFLOW_LOOKUPS)
            .map(|_| pool[usize::try_from(rng.below(pool.len() as u64)).expect("small")].clone())
            .collect();
        let matched: usize = queries.iter().map(|t| set.matches(t).len()).sum();
        let tenths = matched * 10 / queries.len();
        eprintln!(
            "matching: {size} entries built in {built:.2?}, {}.{} matches per queried type on average",
            tenths / 10,
            tenths % 10
        );
        Self { size, set, list, queries, overflow_lookups }
    }
}

fn fixtures() -> Vec<Fixture> {
    SIZES.iter().map(|&size| Fixture::new(size)).collect()
}

fn cold(c: &mut Criterion, fixtures: &[Fixture]) {
    let mut group = c.benchmark_group("match_cold");
    group.throughput(Throughput::Elements(QUERIES as u64));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for f in fixtures {
        group.bench_with_input(BenchmarkId::new("trie", f.size), f, |b, f| {
            b.iter(|| {
                let mut n = 0;
                for t in &f.queries {
                    n += black_box(f.set.matches(black_box(t))).len();
                }
                n
            });
        });
    }
    // The baseline is slow (milliseconds per type at 100k): few flat samples.
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for f in fixtures {
        let Some(list) = &f.list else { continue };
        group.bench_with_input(BenchmarkId::new("scan_every_pattern", f.size), list, |b, list| {
            b.iter(|| {
                let mut n = 0;
                for t in &f.queries {
                    let t = black_box(t);
                    let hits: Vec<u64> = list.iter().filter(|(p, _)| p.matches(t)).map(|&(_, v)| v).collect();
                    n += hits.len();
                }
                n
            });
        });
    }
    group.finish();
}

fn cache_hit(c: &mut Criterion, fixtures: &[Fixture]) {
    let mut group = c.benchmark_group("match_cache_hit");
    group.throughput(Throughput::Elements(QUERIES as u64));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for f in fixtures {
        let mut cache = MatchCache::new(CACHE_CAPACITY);
        // Twice: a type is cached on its second lookup.
        for t in f.queries.iter().chain(&f.queries) {
            cache.get_or_match(&f.set, t);
        }
        cache.reset_stats();
        group.bench_with_input(BenchmarkId::new("cache", f.size), f, |b, f| {
            b.iter(|| {
                let mut n = 0;
                for t in &f.queries {
                    n += black_box(cache.get_or_match(&f.set, black_box(t))).len();
                }
                n
            });
        });
        report_hits("hit", f.size, &cache);
    }
    group.finish();
}

/// Ten times more distinct types than the cache holds, looked up in a random order: the cached
/// path against the cold match of the same lookups.
fn cache_overflow(c: &mut Criterion, fixtures: &[Fixture]) {
    let mut group = c.benchmark_group("match_cache_overflow");
    group.throughput(Throughput::Elements(OVERFLOW_LOOKUPS as u64));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for f in fixtures {
        group.bench_with_input(BenchmarkId::new("trie", f.size), f, |b, f| {
            b.iter(|| {
                let mut n = 0;
                for t in &f.overflow_lookups {
                    n += black_box(f.set.matches(black_box(t))).len();
                }
                n
            });
        });
        let mut cache = MatchCache::new(CACHE_CAPACITY);
        group.bench_with_input(BenchmarkId::new("cache", f.size), f, |b, f| {
            b.iter(|| {
                let mut n = 0;
                for t in &f.overflow_lookups {
                    n += black_box(cache.get_or_match(&f.set, black_box(t))).len();
                }
                n
            });
        });
        report_hits("overflow", f.size, &cache);
    }
    group.finish();
}

/// What a subscribe costs a broker that publishes snapshots: clone the set, insert into the clone
/// (copying the path it shares with the original), drop the clone again.
fn update(c: &mut Criterion, fixtures: &[Fixture]) {
    let mut group = c.benchmark_group("set_update");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(1));
    let patterns = [Pattern::parse("s1.e1.create").expect("valid"), Pattern::parse("s1.*.>").expect("valid")];
    for f in fixtures {
        group.bench_with_input(BenchmarkId::new("clone_insert", f.size), f, |b, f| {
            b.iter(|| {
                let mut next = f.set.clone();
                for p in &patterns {
                    next.insert(p, 0);
                }
                next
            });
        });
    }
    group.finish();
}

fn report_hits(group: &str, size: usize, cache: &MatchCache<u64>) {
    let stats = cache.stats();
    let lookups = stats.hits + stats.misses;
    if let Some(permille) = (stats.hits * 1000).checked_div(lookups) {
        eprintln!(
            "matching: {group} at {size} entries: {}.{}% of {lookups} lookups hit",
            permille / 10,
            permille % 10
        );
    }
}

fn matching(c: &mut Criterion) {
    let fixtures = fixtures();
    cold(c, &fixtures);
    cache_hit(c, &fixtures);
    cache_overflow(c, &fixtures);
    update(c, &fixtures);
}

criterion_group!(benches, matching);
criterion_main!(benches);
