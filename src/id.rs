//! Time-ordered ids: the UUID v7 newtypes events and dead letters are named by.

/// Defines a public UUID v7 id newtype: `new` (time-ordered), `from_uuid`, `as_uuid`,
/// `Display` and `FromStr` in the hyphenated form, `Debug` as `Name(…)`, serde as that string.
macro_rules! uuid_v7_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(uuid::Uuid);

        impl $name {
            /// A new time-ordered id: a UUID v7 from this thread's generator (no system call), in
            /// increasing order among the ids this thread makes. Its lowest four bits are the
            /// thread's lane (three bits, the same in every id the thread makes: each of up to
            /// eight live threads holds a lane of its own) and one random bit, so what partitions
            /// ids by those bits, as the memory provider does, keeps each thread's ids apart from
            /// other threads'.
            #[allow(clippy::new_without_default)] // A default id that is fresh each time would surprise.
            pub fn new() -> Self {
                Self($crate::id::next_v7())
            }

            /// Wraps an existing UUID, of any version (the Go seed writes v4).
            pub const fn from_uuid(uuid: uuid::Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID.
            pub const fn as_uuid(&self) -> &uuid::Uuid {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.hyphenated())
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                uuid::Uuid::parse_str(s).map(Self)
            }
        }
    };
}

pub(crate) use uuid_v7_id;

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

/// A UUID v7 (RFC 9562) from this thread's generator: the Unix time in milliseconds, a 12-bit
/// counter that keeps the ids of one thread increasing within a millisecond (and across a clock
/// that steps back), 59 random bits from a generator seeded once per thread, and the thread's
/// lane in bits 1 to 3 (see [`LANES`]). No system call, and no shared state after a thread's
/// first id (which takes its lane), so making ids scales with threads; uniqueness rests on the 59
/// random bits (plus the counter and the lane).
pub(crate) fn next_v7() -> uuid::Uuid {
    next_v7_at(crate::clock::unix_millis())
}

/// [`next_v7`] for a caller that has read the clock already: `unix_millis` is the current Unix
/// time in milliseconds. An event reads the clock once for its id and its `created_at`.
pub(crate) fn next_v7_at(unix_millis: u64) -> uuid::Uuid {
    thread_local! {
        static GENERATOR: std::cell::RefCell<V7> = std::cell::RefCell::new(V7::seeded());
    }
    GENERATOR
        .try_with(|generator| generator.borrow_mut().next_at(unix_millis))
        // Asked for from another thread-local's destructor, after this thread's generator is
        // gone: an id from a generator of its own, in order with nothing.
        .unwrap_or_else(|_| V7::seeded().next_at(unix_millis))
}

/// Lanes the threads making ids are dealt into: the lowest four bits of an id are its lane (three
/// bits) and one random bit. What partitions ids by their low bits — the memory provider's 16
/// shards — thus keeps one thread's ids in two partitions, and the ids of up to eight threads
/// apart: two publishers storing at once meet in no shard's lock or cache lines, and one
/// publisher alone still spreads its events over two shards.
const LANES: u32 = 8;
const LANE_SHIFT: u32 = 1;
const _: () = assert!((LANES << LANE_SHIFT) == 16, "a lane and its random bit are the low four bits");

/// Which lanes live threads hold, and the lanes they share once all are held.
///
/// A thread takes the lowest free lane with its first id and gives it back when it exits, so a
/// thread that takes over from one that ended (a pool's next worker, a new publisher thread)
/// stores into the shards its predecessor filled, rather than filling two more while the old
/// ones wait to go stale. Past eight live threads, lanes are shared in turn.
struct LaneTable {
    /// Bit `i` set while a live thread holds lane `i`.
    held: AtomicU8,
    /// Turns of the lanes handed out shared.
    shared: AtomicU32,
}

const _: () = assert!(LANES == u8::BITS, "one bit of `held` per lane");

static LANE_TABLE: LaneTable = LaneTable::new();

impl LaneTable {
    const fn new() -> Self {
        Self { held: AtomicU8::new(0), shared: AtomicU32::new(0) }
    }

    /// The lowest free lane, held until the returned `Lane` drops; a shared one if none is free.
    fn take(&'static self) -> Lane {
        // Relaxed: the bits order nothing else; a read-modify-write keeps each lane to one holder.
        let taken = self.held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            (held != u8::MAX).then(|| held | (1 << (!held).trailing_zeros()))
        });
        match taken {
            Ok(before) => Lane { index: (!before).trailing_zeros(), table: Some(self) },
            Err(_) => Lane { index: self.shared.fetch_add(1, Ordering::Relaxed) % LANES, table: None },
        }
    }
}

/// A thread's lane, given back to its table on drop when the thread held it alone.
struct Lane {
    index: u32,
    table: Option<&'static LaneTable>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(table) = self.table {
            // Relaxed: see `LaneTable::take`.
            table.held.fetch_and(!(1 << self.index), Ordering::Relaxed);
        }
    }
}

/// One thread's v7 state.
struct V7 {
    /// This thread's lane, given back when the thread exits.
    lane: Lane,
    /// The millisecond of the last id, which never goes down.
    millis: u64,
    /// The 12-bit counter of the last id.
    counter: u16,
    rng: fastrand::Rng,
}

/// The counter's range: 12 bits.
const COUNTER_MAX: u16 = 0x0FFF;

impl V7 {
    fn seeded() -> Self {
        Self { lane: LANE_TABLE.take(), millis: 0, counter: 0, rng: fastrand::Rng::new() }
    }

    /// The next id at Unix time `now` (milliseconds); a `now` behind the last id's counts as the
    /// last id's millisecond.
    fn next_at(&mut self, now: u64) -> uuid::Uuid {
        if now > self.millis {
            self.millis = now;
            // A random start in the lower half leaves room to count up within the millisecond.
            self.counter = self.rng.u16(..=COUNTER_MAX / 2);
        } else if self.counter < COUNTER_MAX {
            self.counter += 1;
        } else {
            // 4 096 ids within one millisecond: borrow the next one, which keeps the order.
            self.millis += 1;
            self.counter = self.rng.u16(..=COUNTER_MAX / 2);
        }
        let millis = u128::from(self.millis & 0xFFFF_FFFF_FFFF);
        let lane_bits = u64::from(LANES - 1) << LANE_SHIFT;
        let random =
            (self.rng.u64(..) & ((1 << 62) - 1) & !lane_bits) | (u64::from(self.lane.index) << LANE_SHIFT);
        let random = u128::from(random);
        let bits = (millis << 80) | (0x7 << 76) | (u128::from(self.counter) << 64) | (0b10 << 62) | random;
        uuid::Uuid::from_u128(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_7_and_increase_within_a_thread() {
        let ids: Vec<uuid::Uuid> = (0..20_000).map(|_| next_v7()).collect();
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing on one thread");
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        let (seconds, _) = ids[0].get_timestamp().expect("v7 has a timestamp").to_unix();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(now.abs_diff(seconds) < 5, "the timestamp is now");
    }

    #[test]
    fn a_full_millisecond_borrows_the_next_one_and_keeps_the_order() {
        let mut generator = V7 {
            lane: Lane { index: 0, table: None },
            millis: u64::MAX >> 20,
            counter: COUNTER_MAX - 1,
            rng: fastrand::Rng::with_seed(1),
        };
        let now = generator.millis;
        let a = generator.next_at(now);
        let b = generator.next_at(now);
        let c = generator.next_at(now);
        assert!(a < b && b < c, "{a} {b} {c}");
    }

    #[test]
    fn a_clock_that_steps_back_keeps_the_order() {
        let mut generator = V7 {
            lane: Lane { index: 0, table: None },
            millis: 0,
            counter: 0,
            rng: fastrand::Rng::with_seed(2),
        };
        let ids: Vec<uuid::Uuid> =
            [1_000, 1_000, 999, 5, 1_000, 1_001].into_iter().map(|now| generator.next_at(now)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let millis = |id: &uuid::Uuid| id.get_timestamp().expect("v7 has a timestamp").to_unix();
        assert_eq!(millis(&ids[3]), (1, 0), "a step back keeps the last millisecond");
        assert_eq!(millis(&ids[5]), (1, 1_000_000));
    }

    #[test]
    fn one_threads_ids_share_their_lane() {
        let low: Vec<u128> = (0..1_000).map(|_| next_v7().as_u128() & 0xF).collect();
        let lane = low[0] >> LANE_SHIFT;
        assert!(low.iter().all(|bits| bits >> LANE_SHIFT == lane), "one lane: {low:?}");
        assert!(
            low.contains(&(lane << LANE_SHIFT)) && low.contains(&((lane << LANE_SHIFT) | 1)),
            "and a random bit"
        );
        let other = std::thread::spawn(|| next_v7().as_u128() & 0xF).join().unwrap();
        assert!(other >> LANE_SHIFT < u128::from(LANES));
    }

    #[test]
    fn threads_take_the_lowest_free_lane_and_share_once_all_are_taken() {
        static TABLE: LaneTable = LaneTable::new();
        let lanes: Vec<Lane> = (0..LANES).map(|_| TABLE.take()).collect();
        assert_eq!(lanes.iter().map(|lane| lane.index).collect::<Vec<_>>(), (0..LANES).collect::<Vec<_>>());
        let shared = [TABLE.take(), TABLE.take()];
        assert!(shared.iter().all(|lane| lane.table.is_none()), "shared once all are held");
        assert_ne!(shared[0].index, shared[1].index, "in turn");
        drop(shared);
        assert_eq!(TABLE.held.load(Ordering::Relaxed), u8::MAX, "shared lanes are not given back");
        let mut lanes = lanes;
        drop(lanes.remove(5));
        drop(lanes.remove(2));
        let two = TABLE.take();
        assert_eq!(two.index, 2, "the lowest free");
        let five = TABLE.take();
        assert_eq!(five.index, 5);
        drop(lanes);
        drop((two, five));
        assert_eq!(TABLE.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn threads_make_distinct_ids() {
        let ids: Vec<uuid::Uuid> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..4).map(|_| s.spawn(|| (0..5_000).map(|_| next_v7()).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
