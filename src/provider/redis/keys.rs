//! The names of everything the provider keeps in Redis, and the two encodings its indexes rest on:
//! time keys (exact `(time, id)` order as plain strings) and sequence numbers (stream entry ids
//! packed into a `u64`).

use std::fmt::{self, Display};

use jiff::Timestamp;

use crate::error::{ProviderError, ProviderErrorKind};

use super::NAME;

/// Longest key prefix, stream name, group or consumer name accepted, in bytes.
pub(super) const MAX_NAME_LEN: usize = 200;

/// The keys of one provider namespace (`<prefix>:…`).
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// The event stream, `<prefix>:<stream>`.
    pub(super) stream: String,
    /// What the status hash keys start with, `<prefix>:status:`; the event id follows.
    pub(super) status: String,
    /// Events stored and still pending, which have no status hash yet: event id → `<entry id>
    /// <time key>`.
    pub(super) pending: String,
    /// The `(created_at, id)` index of stored events.
    pub(super) time: String,
    /// `<entry id> <event id>` of the entries the provider added, in stream order: what trimming
    /// removes, named without reading the entries.
    pub(super) order: String,
    /// Finished events by the time their status expires.
    pub(super) expiry: String,
    /// Counters: stored events per status, and the backend-wide figures in `provider_specific`.
    pub(super) counts: String,
    /// Dead letters by id.
    pub(super) dead: String,
    /// The `(failed_at, id)` index of dead letters.
    pub(super) dead_order: String,
}

impl Keys {
    pub(super) fn new(prefix: &str, stream: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            stream: format!("{prefix}:{stream}"),
            status: format!("{prefix}:status:"),
            pending: format!("{prefix}:pending"),
            time: format!("{prefix}:time"),
            order: format!("{prefix}:order"),
            expiry: format!("{prefix}:expiry"),
            counts: format!("{prefix}:counts"),
            dead: format!("{prefix}:dead"),
            dead_order: format!("{prefix}:dead:order"),
        }
    }

    /// Entries each consumer group lost (trimmed before it read them): group key → count.
    pub(super) fn group_lost(&self) -> String {
        format!("{}:lost", self.stream)
    }

    /// The naks of consumer group `group` that hold entries back longer than its claim idle time:
    /// entry id scored by when it is due again (server time, ms).
    pub(super) fn naks_of(&self, group: &str) -> String {
        format!("{}:naks:{group}", self.stream)
    }

    /// The status hash of event `id`.
    pub(super) fn status_of(&self, id: impl Display) -> String {
        format!("{}{id}", self.status)
    }
}

/// Checks a key prefix or stream name: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits and
/// `_ - . : { }` (no glob characters, so `SCAN MATCH <prefix>:*` means what it says).
pub(super) fn validate_key_part(what: &'static str, value: &str) -> Result<(), ProviderError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:{}".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "configure",
            format!(
                "{what} {value:?} must be 1 to {MAX_NAME_LEN} bytes of ASCII letters, digits and `_ - . : {{ }}`"
            ),
        ))
    }
}

/// Checks a consumer group or consumer name: 1 to [`MAX_NAME_LEN`] bytes, no whitespace or control
/// characters.
pub(super) fn validate_member_name(what: &'static str, value: &str) -> Result<(), ProviderError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && !value.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "open_inbound",
            format!(
                "{what} {value:?} must be 1 to {MAX_NAME_LEN} bytes without whitespace or control characters"
            ),
        ))
    }
}

pub(super) fn invalid(operation: &'static str, reason: String) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::InvalidInput(reason))
}

/// Nanoseconds that shift [`Timestamp::MIN`] to zero, so every timestamp is a non-negative
/// 21-digit number (the largest, [`Timestamp::MAX`], is about 6.3 × 10²⁰).
const EPOCH_SHIFT_NS: i128 = 377_705_116_800 * 1_000_000_000;

/// Digits of a time key's time part.
pub(super) const TIME_DIGITS: usize = 21;

/// The time part of a time key: `at` as 21 zero-padded digits, so string order is time order.
pub(super) struct TimeDigits(pub(super) Timestamp);

impl Display for TimeDigits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shifted = self.0.as_nanosecond() + EPOCH_SHIFT_NS;
        write!(f, "{shifted:0TIME_DIGITS$}")
    }
}

/// `<21 digits of at>:<id>`: members of a sorted set whose scores are all 0 sort by `(at, id)`
/// under `ZRANGE … BYLEX`, exactly, at nanosecond precision (a score, a double, would not).
/// Hyphenated lowercase UUIDs sort as the UUIDs do.
pub(super) struct TimeKey<I>(pub(super) Timestamp, pub(super) I);

impl<I: Display> Display for TimeKey<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", TimeDigits(self.0), self.1)
    }
}

/// The lower end of a `BYLEX` range for `start` (inclusive), `-` for none.
pub(super) fn lex_from(start: Option<Timestamp>) -> String {
    start.map_or_else(|| "-".to_owned(), |at| format!("[{}", TimeDigits(at)))
}

/// The upper end of a `BYLEX` range for `end` (exclusive), `+` for none. Every key at `end` is
/// `<digits>:<id>`, which sorts after `<digits>`, so `(<digits>` leaves them out.
pub(super) fn lex_to(end: Option<Timestamp>) -> String {
    end.map_or_else(|| "+".to_owned(), |at| format!("({}", TimeDigits(at)))
}

/// Bits of a sequence number that hold the entry id's sequence part.
const SEQ_BITS: u32 = 20;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// The sequence number of stream entry `ms-n`: `ms << 20 | n`. Entry ids strictly increase, and so
/// do these numbers, as long as `n` stays below 2²⁰ (1 048 576 entries within one millisecond of
/// Redis' clock; the store script moves to the next millisecond long before). `ms` fits in the
/// remaining 44 bits until the year 2527. `None` for an id outside that range.
pub(super) fn seq_of_entry(entry: &str) -> Option<u64> {
    let (ms, n) = entry.split_once('-')?;
    let (ms, n): (u64, u64) = (ms.parse().ok()?, n.parse().ok()?);
    (n <= SEQ_MASK && ms < (1 << (64 - SEQ_BITS))).then_some(ms << SEQ_BITS | n)
}

/// The first sequence number after stream entry `entry`: where a replay goes on past it. For an
/// entry whose `n` is 2²⁰ or more (written by something else, as no entry of the store is), the
/// next millisecond's first: the entries in between cannot be the store's either. `None` past the
/// last millisecond a sequence number holds (the year 2527), or for a malformed id.
pub(super) fn seq_after_entry(entry: &str) -> Option<u64> {
    let (ms, n) = entry.split_once('-')?;
    let (ms, n): (u64, u64) = (ms.parse().ok()?, n.parse().ok()?);
    let (ms, n) = if n < SEQ_MASK { (ms, n + 1) } else { (ms.checked_add(1)?, 0) };
    (ms < (1 << (64 - SEQ_BITS))).then_some(ms << SEQ_BITS | n)
}

/// The stream entry id of sequence number `seq`; the inverse of [`seq_of_entry`].
pub(super) fn entry_of_seq(seq: u64) -> String {
    format!("{}-{}", seq >> SEQ_BITS, seq & SEQ_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_round_trip_and_keep_order() {
        let ids = ["0-1", "0-2", "1-0", "1796060295647-0", "1796060295647-7", "1796060295648-0"];
        let seqs: Vec<u64> = ids.iter().map(|id| seq_of_entry(id).expect("in range")).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        for (id, seq) in ids.iter().zip(&seqs) {
            assert_eq!(entry_of_seq(*seq), *id);
        }
        assert_eq!(seq_of_entry("0-1"), Some(1));
        assert_eq!(seq_after_entry("1796060295647-7"), seq_of_entry("1796060295647-8"));
        assert_eq!(seq_after_entry("5-1048575"), seq_of_entry("6-0"), "n at 2²⁰ - 1");
        assert_eq!(seq_after_entry("5-2000000"), seq_of_entry("6-0"), "another writer's n past 2²⁰");
        assert_eq!(seq_after_entry("17592186044415-1048575"), None, "past the last millisecond");
        assert_eq!(
            seq_after_entry("17592186044415-7").map(entry_of_seq).as_deref(),
            Some("17592186044415-8")
        );
        assert_eq!(seq_of_entry("5-1048576"), None, "n past 2^20 does not fit");
        assert_eq!(seq_of_entry("17592186044416-0"), None, "ms past 2^44 does not fit");
        assert_eq!(seq_of_entry("12"), None);
    }

    #[test]
    fn time_keys_sort_as_time_then_id() {
        let id = "0190a0b0-0000-7000-8000-000000000000";
        let times = [
            Timestamp::MIN,
            Timestamp::new(-1, 999_999_999).expect("valid"),
            Timestamp::UNIX_EPOCH,
            Timestamp::new(1_700_000_000, 1).expect("valid"),
            Timestamp::MAX,
        ];
        let keys: Vec<String> = times.iter().map(|t| TimeKey(*t, id).to_string()).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        assert!(keys.iter().all(|k| k.len() == TIME_DIGITS + 1 + id.len()));
        assert_eq!(&keys[2][TIME_DIGITS + 1..], id, "the scripts find the id at byte 23");
        // A range end at a time excludes the keys at that time; a start includes them.
        let at = times[3];
        assert!(lex_to(Some(at))[1..] < *keys[3]);
        assert!(lex_from(Some(at))[1..] <= *keys[3]);
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_key_part("key prefix", "eventbroker:{app-1}.v2").is_ok());
        for bad in ["", "a b", "a*", "a?", "é", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(validate_key_part("key prefix", bad).is_err(), "{bad:?}");
        }
        assert!(validate_member_name("consumer", "api-1/ß").is_ok());
        assert!(validate_member_name("consumer", "a b").is_err());
        assert!(validate_member_name("consumer", "").is_err());
    }
}
