//! One broker's membership of a Redis consumer group; see the module docs of
//! [`redis`](super) for how a fetch proceeds.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{Connection, RedisError, Value};

use super::conn::{self, Backoff};
use super::keys::{entry_of_seq, seq_of_entry, validate_member_name};
use super::reply::{self, Entry};
use super::scripts::Call;
use super::{Counters, NAME, Shared};
use crate::error::ProviderError;
use crate::pattern::{Pattern, PatternSet};
use crate::provider::{Ack, AckToken, InboundConfig, InboundEvent, closed_error};

/// Longest single blocking read: how soon a waiting fetch notices a nak come due, a claim scan
/// come due, or its source closed.
const MAX_BLOCK: Duration = Duration::from_millis(500);
/// Most often the pending list is scanned for abandoned entries.
const MAX_CLAIM_INTERVAL: Duration = Duration::from_secs(1);
const MIN_CLAIM_INTERVAL: Duration = Duration::from_millis(10);
/// Pending entries looked at per claim scan, and per page when reading a predecessor's.
const PENDING_PAGE: usize = 256;
/// Most entries asked for, claimed or acknowledged per call (Lua's argument limit is 8000).
const MAX_PER_CALL: usize = 1024;
/// A consumer that holds no pending entry and was handed nothing for this many claim idle times
/// is removed from its group by the other members' sweeps: a member that is gone.
const CONSUMER_IDLE_FACTOR: u32 = 10;
/// The least idle time before such a removal, whatever the claim idle time: a sweep reads the
/// group's whole consumer list, so a member sweeps at most once a second.
const MIN_CONSUMER_IDLE: Duration = Duration::from_secs(1);
/// Most consumers one sweep removes, so a sweep of a list that grew long for years stays short.
const SWEEP_MAX: usize = 1000;

/// One broker's source: a consumer named by its instance id in the group named by its group's key.
pub(super) struct RedisInbound {
    shared: Arc<Shared>,
    group: String,
    consumer: String,
    /// The group's naks longer than the claim idle time (see `Keys::naks_of`).
    naks: String,
    /// What the group lost, as the last read found it (see the `READ_NEW` script).
    group_lost: AtomicU64,
    shared_group: bool,
    claim_idle: Duration,
    /// The connection blocking reads run on; only `fetch` uses it.
    conn: Mutex<Option<Connection>>,
    backoff: Mutex<Backoff>,
    /// Set when the fetch connection was dropped after a failure.
    lost: AtomicBool,
    state: Mutex<FetchState>,
    /// `None` until the first `set_filter`: everything is wanted.
    filter: Mutex<Option<Arc<PatternSet<()>>>>,
    closed: AtomicBool,
}

/// What a fetch hands out before new entries, and what the member holds.
struct FetchState {
    /// Own pending entries to hand out again: what the predecessor of this consumer left, read
    /// when the source opened, and what a failed fetch may have read without handing it out.
    inherited: VecDeque<String>,
    /// Entries handed out and neither acknowledged nor given back.
    outstanding: HashSet<String>,
    /// Set when a fetch failed after Redis may have moved entries into this member's pending list:
    /// the next fetch looks for those first.
    resync: bool,
    /// Entries given back with a nak, and when they are due again.
    delayed: Vec<(Instant, String)>,
    /// Where the next scan of the pending list starts (`-` or `(<id>`).
    claim_cursor: String,
    /// The last entry the group is known to have read: its position when the source opened, then
    /// the last new entry this member read. A group that vanished is made again from here.
    position: String,
    next_claim_scan: Instant,
    /// When this member next looks for consumers that are gone (shared groups only).
    next_sweep: Instant,
}

impl FetchState {
    /// Own entries to hand out again now, at most `max`: due naks first, then inherited ones (how
    /// many of those is the second value).
    fn own_due(&self, now: Instant, max: usize) -> (Vec<String>, usize) {
        let max = max.min(MAX_PER_CALL);
        let mut ids: Vec<String> =
            self.delayed.iter().filter(|(at, _)| *at <= now).map(|(_, id)| id.clone()).take(max).collect();
        let naked = ids.len();
        ids.extend(self.inherited.iter().take(max - naked).cloned());
        let inherited = ids.len() - naked;
        (ids, inherited)
    }

    /// Forgets what [`FetchState::own_due`] returned, once it was handed out.
    fn forget(&mut self, ids: &[String], inherited: usize) {
        let naked = &ids[..ids.len() - inherited];
        if !naked.is_empty() {
            self.delayed.retain(|(_, id)| !naked.contains(id));
        }
        self.inherited.drain(..inherited.min(self.inherited.len()));
    }

    /// The next moment something other than a new entry may be ready.
    fn next_wake(&self) -> Instant {
        let nak = self.delayed.iter().map(|(at, _)| *at).min();
        nak.map_or(self.next_claim_scan, |at| at.min(self.next_claim_scan))
    }
}

impl RedisInbound {
    pub(super) fn open(shared: Arc<Shared>, config: &InboundConfig) -> Result<Self, ProviderError> {
        let group = config.group().key();
        validate_member_name("consumer group", &group)?;
        validate_member_name("consumer", config.consumer())?;
        let stream = shared.keys.stream.clone();
        let position = shared
            .pool
            .run("open_inbound", &group, |conn| create_group(conn, &shared, &stream, &group, "$"))?;
        let inherited = inherited_entries(&shared, "open_inbound", &group, config.consumer())?;
        if !inherited.is_empty() {
            tracing::info!(
                group,
                consumer = config.consumer(),
                count = inherited.len(),
                "redis provider: redelivering entries a previous incarnation left unacknowledged"
            );
        }
        Counters::add(&shared.counters.open_sources, 1);
        Ok(Self {
            backoff: Mutex::new(Backoff::new(shared.config.max_backoff)),
            naks: shared.keys.naks_of(&group),
            group_lost: AtomicU64::new(0),
            shared,
            group,
            consumer: config.consumer().to_owned(),
            shared_group: config.group().is_shared(),
            claim_idle: config.claim_idle(),
            conn: Mutex::new(None),
            lost: AtomicBool::new(false),
            state: Mutex::new(FetchState {
                inherited,
                outstanding: HashSet::new(),
                resync: false,
                delayed: Vec::new(),
                claim_cursor: "-".to_owned(),
                next_claim_scan: Instant::now(),
                next_sweep: Instant::now(),
                position,
            }),
            filter: Mutex::new(None),
            closed: AtomicBool::new(false),
        })
    }

    fn check_open(&self, operation: &'static str) -> Result<(), ProviderError> {
        // Acquire: pairs with the Release in `close`.
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_error(NAME, operation));
        }
        self.shared.check_open(operation)
    }

    fn claim_interval(&self) -> Duration {
        (self.claim_idle / 4).clamp(MIN_CLAIM_INTERVAL, MAX_CLAIM_INTERVAL)
    }

    /// New entries, at most `count`, without blocking, having counted what the group lost to
    /// trimming (see the `READ_NEW` script); `audit`: look even when the member's last read entry
    /// is still in the stream (after a claim scan, so at most every `claim_interval`).
    fn read_new(&self, conn: &mut Connection, count: usize, audit: bool) -> Result<Vec<Entry>, RedisError> {
        let keys = &self.shared.keys;
        let mut call = Call::new(&self.shared.scripts.read_new, &[&keys.stream, &keys.group_lost()]);
        let position = self.state.lock().position.clone();
        call.arg(&self.group).arg(&self.consumer).arg(count).arg(position).arg(u8::from(audit));
        let value: Value = call.invoke(conn)?;
        let mut parts = reply::array(value)
            .ok_or_else(|| malformed_reply(reply::Malformed::new("a read is not an array")))?
            .into_iter();
        let read = parts.next().unwrap_or(Value::Nil);
        let lost =
            parts.next().as_ref().and_then(reply::int).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        let before = self.group_lost.swap(lost, Ordering::Relaxed);
        if lost > before {
            tracing::warn!(
                group = self.group,
                count = lost - before,
                "redis provider: the stream was trimmed past entries the group had not read; they are lost to it"
            );
        }
        new_entries(read).map_err(malformed_reply)
    }

    /// How long a consumer that holds nothing must have been handed nothing before a sweep removes
    /// it: `CONSUMER_IDLE_FACTOR` claim idle times, at least `MIN_CONSUMER_IDLE`.
    fn consumer_idle(&self) -> Duration {
        self.claim_idle.saturating_mul(CONSUMER_IDLE_FACTOR).max(MIN_CONSUMER_IDLE)
    }

    /// Removes the group's consumers that are gone (see the `SWEEP_CONSUMERS` script); then rests
    /// for one consumer idle time.
    fn sweep_consumers(&self, conn: &mut Connection, now: Instant) -> Result<(), RedisError> {
        let idle = self.consumer_idle();
        let mut call = Call::new(&self.shared.scripts.sweep_consumers, &[&self.shared.keys.stream]);
        call.arg(&self.group).arg(&self.consumer).arg(Self::idle_ms(idle)).arg(SWEEP_MAX);
        let removed: i64 = call.invoke(conn)?;
        if removed > 0 {
            tracing::info!(
                group = self.group,
                count = removed,
                idle_ms = Self::idle_ms(idle),
                "redis provider: removed consumers that held nothing and were handed nothing for the idle time"
            );
        }
        self.state.lock().next_sweep = now.checked_add(idle).unwrap_or(now + Duration::from_secs(86_400));
        Ok(())
    }

    /// `idle` in milliseconds as Redis takes an idle time: a signed 64-bit number, so a claim idle
    /// time of `Duration::MAX` (never claim) means about 292 million years, not an error.
    fn idle_ms(idle: Duration) -> i64 {
        i64::try_from(idle.as_millis()).unwrap_or(i64::MAX)
    }

    /// One pass: own due entries, abandoned ones, then new ones (blocking until `deadline` when
    /// nothing else came). Returns what the member wants, having acknowledged the rest.
    fn fetch_once(
        &self,
        conn: &mut Connection,
        max: usize,
        deadline: Instant,
    ) -> Result<Vec<InboundEvent>, RedisError> {
        let stream = &self.shared.keys.stream;
        let now = Instant::now();
        let mut got: Vec<(Entry, u32)> = Vec::new();

        let (own, inherited) = self.state.lock().own_due(now, max);
        // Entries this member gave back (a nak), as opposed to ones its predecessor left.
        let given_back: HashSet<String> = own[..own.len() - inherited].iter().cloned().collect();
        if !own.is_empty() {
            let mut call = Call::new(&self.shared.scripts.claim_own, &[stream, &self.naks]);
            call.arg(&self.group).arg(&self.consumer);
            for id in &own {
                call.arg(id);
            }
            let value: Value = call.invoke(conn)?;
            let (lost, held, claimed) = claimed_entries(value).map_err(malformed_reply)?;
            Counters::add(&self.shared.counters.lost, lost);
            got.extend(claimed);
            let mut state = self.state.lock();
            state.forget(&own, inherited);
            // A predecessor's nak still running: handed out when it comes due.
            for (id, wait) in held {
                state.delayed.push((now.checked_add(wait).unwrap_or(now + Duration::from_secs(86_400)), id));
            }
        }

        let scan = {
            let state = self.state.lock();
            (got.len() < max && now >= state.next_claim_scan).then(|| state.claim_cursor.clone())
        };
        let scanned = scan.is_some();
        if let Some(cursor) = scan {
            let mut call = Call::new(&self.shared.scripts.claim_abandoned, &[stream, &self.naks]);
            call.arg(&self.group)
                .arg(&self.consumer)
                .arg(Self::idle_ms(self.claim_idle))
                .arg(cursor)
                .arg(PENDING_PAGE)
                .arg((max - got.len()).min(MAX_PER_CALL));
            let value: Value = call.invoke(conn)?;
            let (next, lost, claimed) = abandoned_entries(value).map_err(malformed_reply)?;
            Counters::add(&self.shared.counters.lost, lost);
            got.extend(claimed);
            let mut state = self.state.lock();
            // A scan that went through the whole list rests; one cut short continues at once.
            state.next_claim_scan = if next == "-" { now + self.claim_interval() } else { now };
            state.claim_cursor = next;
        }

        if self.shared_group && now >= self.state.lock().next_sweep {
            self.sweep_consumers(conn, now)?;
        }

        if got.len() < max {
            let count = (max - got.len()).min(MAX_PER_CALL);
            let mut new = self.read_new(conn, count, scanned)?;
            let block = if got.is_empty() && new.is_empty() {
                let until = self.state.lock().next_wake().min(deadline);
                until.checked_duration_since(Instant::now()).map(|left| left.min(MAX_BLOCK))
            } else {
                None
            };
            // Nothing came: wait for new entries. The script cannot block, and this read does not
            // look for losses; the next script call does, before anything trimmed unread could
            // be read past (a store call would have to add more than `max_len` entries meanwhile,
            // which the periodic look of `read_new` then finds, once the group has caught up).
            if let Some(block) = block.filter(|b| b.as_millis() > 0) {
                let value: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(Self::idle_ms(block))
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(">")
                    .query(conn)?;
                new = new_entries(value).map_err(malformed_reply)?;
            }
            if let Some(last) = new.last() {
                self.state.lock().position.clone_from(&last.id);
            }
            got.extend(new.into_iter().map(|entry| (entry, 1)));
        }
        self.sort_out(conn, got, &given_back)
    }

    /// Turns fetched entries into events for the member; acknowledges echoes, unwanted and
    /// malformed entries.
    ///
    /// In a shared group, an entry this member gave back (`given_back`) and no longer wants is not
    /// acknowledged but released to the other members (its idle time set to the claim idle time,
    /// so their next claim scan takes it): it was given back for a member that still wants it.
    fn sort_out(
        &self,
        conn: &mut Connection,
        got: Vec<(Entry, u32)>,
        given_back: &HashSet<String>,
    ) -> Result<Vec<InboundEvent>, RedisError> {
        let counters = &self.shared.counters;
        let filter = self.filter.lock().clone();
        let mut out = Vec::with_capacity(got.len());
        let mut done = Vec::new();
        let mut release = Vec::new();
        for (mut entry, deliveries) in got {
            if entry.field("origin") == Some(self.group.as_bytes()) {
                Counters::add(&counters.echoes_skipped, 1);
                done.push(entry.id);
                continue;
            }
            let event = match entry.event() {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(
                        group = self.group,
                        reason = error.0,
                        "redis provider: acknowledging an entry that holds no event"
                    );
                    Counters::add(&counters.malformed, 1);
                    done.push(entry.id);
                    continue;
                }
            };
            if filter.as_ref().is_some_and(|set| !set.is_match(&event.event_type)) {
                if self.shared_group && given_back.contains(&entry.id) {
                    release.push(entry.id);
                } else {
                    Counters::add(&counters.filtered, 1);
                    done.push(entry.id);
                }
                continue;
            }
            let Some(seq) = seq_of_entry(&entry.id) else {
                tracing::warn!(
                    group = self.group,
                    entry = entry.id,
                    "redis provider: acknowledging an entry whose id maps to no token"
                );
                Counters::add(&counters.malformed, 1);
                done.push(entry.id);
                continue;
            };
            if deliveries > 1 {
                Counters::add(&counters.redelivered, 1);
            }
            out.push(InboundEvent { event: Arc::new(event), token: AckToken::new(seq), deliveries });
        }
        if !done.is_empty() {
            redis::cmd("XACK").arg(&self.shared.keys.stream).arg(&self.group).arg(&done).exec(conn)?;
        }
        if !release.is_empty() {
            let mut call = Call::new(&self.shared.scripts.touch, &[&self.shared.keys.stream, &self.naks]);
            call.arg(&self.group).arg(&self.consumer).arg(Self::idle_ms(self.claim_idle)).arg("");
            for id in &release {
                call.arg(id);
            }
            call.invoke::<i64>(conn)?;
        }
        self.state.lock().outstanding.extend(out.iter().map(|e| entry_of_seq(e.token.get())));
        Counters::add(&counters.consumed, out.len());
        Ok(out)
    }

    fn connection<'a>(&self, slot: &'a mut Option<Connection>) -> Result<&'a mut Connection, ProviderError> {
        if slot.is_none() {
            let dialer = self.shared.pool.dialer();
            let conn =
                conn::connect(dialer, &self.backoff, &self.lost, &self.shared.pool.reconnects, "fetch")?;
            // Blocking reads last up to MAX_BLOCK on top of the usual bound.
            conn.set_read_timeout(Some(self.shared.pool.dialer().timeout().saturating_add(MAX_BLOCK)))
                .map_err(|error| conn::map_error("fetch", &self.group, &error))?;
            *slot = Some(conn);
        }
        Ok(slot.as_mut().expect("just filled"))
    }

    /// The group is gone (its stream was deleted, or Redis restarted without persistence): create
    /// it again where this member last knew it to be, forgetting what the old one had pending. What
    /// other instances stored since the loss (their writers' retried batches land as soon as Redis
    /// answers, often before this fetch) is then delivered, and nothing the member already read.
    fn recreate_group(&self, conn: &mut Connection) -> Result<(), RedisError> {
        let mut state = self.state.lock();
        tracing::warn!(
            group = self.group,
            stream = self.shared.keys.stream,
            position = state.position,
            "redis provider: the consumer group is gone; creating it again after the last entry it read"
        );
        state.inherited.clear();
        state.outstanding.clear();
        state.delayed.clear();
        "-".clone_into(&mut state.claim_cursor);
        let start = state.position.clone();
        drop(state);
        let position = create_group(conn, &self.shared, &self.shared.keys.stream, &self.group, &start)?;
        self.state.lock().position = position;
        Ok(())
    }

    /// After a failed fetch: queues this member's pending entries that it neither handed out nor
    /// holds for a nak, which a read whose reply was lost left there.
    fn resync(&self) -> Result<(), ProviderError> {
        let pending = inherited_entries(&self.shared, "fetch", &self.group, &self.consumer)?;
        let mut state = self.state.lock();
        let known: HashSet<&String> = state
            .outstanding
            .iter()
            .chain(state.inherited.iter())
            .chain(state.delayed.iter().map(|(_, id)| id))
            .collect();
        let unseen: Vec<String> = pending.into_iter().filter(|id| !known.contains(id)).collect();
        if !unseen.is_empty() {
            tracing::info!(
                group = self.group,
                count = unseen.len(),
                "redis provider: handing out entries a failed fetch left pending"
            );
        }
        state.inherited.extend(unseen);
        state.resync = false;
        Ok(())
    }

    /// Hands what a closing member of a shared group holds to the others at once, rather than
    /// after the claim idle time: all of it, a page of the pending list at a time.
    fn release_held(&self) -> Result<(), ProviderError> {
        let mut start = "-".to_owned();
        loop {
            let held = pending_of(&self.shared, "close", &self.group, &self.consumer, &start, MAX_PER_CALL)?;
            let tokens: Vec<AckToken> =
                held.iter().filter_map(|id| seq_of_entry(id)).map(AckToken::new).collect();
            self.touch("close", &tokens, self.claim_idle, None)?;
            match held.last() {
                Some(last) if held.len() == MAX_PER_CALL => start = format!("({last}"),
                _ => return Ok(()),
            }
        }
    }

    /// Sets the idle time of `tokens` this member still owns (see the `TOUCH` script); with
    /// `hold`, also records them as held back by a nak for that long (`Duration::ZERO`: drops
    /// their records).
    fn touch(
        &self,
        operation: &'static str,
        tokens: &[AckToken],
        idle: Duration,
        hold: Option<Duration>,
    ) -> Result<(), ProviderError> {
        let stream = &self.shared.keys.stream;
        // At most 2⁵³ ms (285 000 years, "never"): the due time stays exact in a script's numbers.
        let record = hold.map_or_else(String::new, |hold| Self::idle_ms(hold).min(1 << 53).to_string());
        for chunk in tokens.chunks(MAX_PER_CALL) {
            let mut call = Call::new(&self.shared.scripts.touch, &[stream, &self.naks]);
            call.arg(&self.group).arg(&self.consumer).arg(Self::idle_ms(idle)).arg(&record);
            for token in chunk {
                call.arg(entry_of_seq(token.get()));
            }
            self.shared.pool.run(operation, &self.group, |conn| call.invoke::<i64>(conn))?;
        }
        Ok(())
    }
}

impl crate::provider::Inbound for RedisInbound {
    fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError> {
        self.check_open("fetch")?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let deadline = started.checked_add(wait).unwrap_or(started + Duration::from_secs(86_400));
        let mut slot = self.conn.lock();
        loop {
            self.check_open("fetch")?;
            if self.state.lock().resync {
                self.resync()?;
            }
            let conn = self.connection(&mut slot)?;
            match self.fetch_once(conn, max, deadline) {
                Ok(events) if !events.is_empty() || Instant::now() >= deadline => return Ok(events),
                Ok(_) => {}
                Err(error) if error.code() == Some("NOGROUP") => {
                    if let Err(error) = self.recreate_group(conn) {
                        return Err(conn::map_error("fetch", &self.group, &error));
                    }
                }
                Err(error) => {
                    if !conn::keeps_connection(&error) {
                        *slot = None;
                        // Relaxed: a statistic's flag.
                        self.lost.store(true, Ordering::Relaxed);
                    }
                    self.state.lock().resync = true;
                    return Err(conn::map_error("fetch", &self.group, &error));
                }
            }
        }
    }

    fn ack(&self, acks: &[Ack]) -> Result<(), ProviderError> {
        self.check_open("ack")?;
        let stream = &self.shared.keys.stream;
        for chunk in acks.chunks(MAX_PER_CALL) {
            let ids: Vec<String> = chunk.iter().map(|ack| entry_of_seq(ack.token.get())).collect();
            self.shared.pool.run("ack", &self.group, |conn| {
                redis::cmd("XACK").arg(stream).arg(&self.group).arg(&ids).exec(conn)
            })?;
            let mut state = self.state.lock();
            for id in &ids {
                state.outstanding.remove(id);
            }
        }
        Ok(())
    }

    fn nak(&self, tokens: &[AckToken], delay: Duration) -> Result<(), ProviderError> {
        self.check_open("nak")?;
        // Redis has no delayed redelivery. A nak within the claim idle time sets the entries' idle
        // time so that the others' claim scans take them once the delay has passed; a longer one
        // (an idle time below 0) is recorded, and the claim scans skip entries until it is due.
        // Capping the delay at the claim idle time would keep at-least-once too, but hand a retry
        // out before the backoff the caller asked for.
        if delay > self.claim_idle {
            self.touch("nak", tokens, Duration::ZERO, Some(delay))?;
        } else {
            self.touch("nak", tokens, self.claim_idle.saturating_sub(delay), Some(Duration::ZERO))?;
        }
        let now = Instant::now();
        let due = now.checked_add(delay).unwrap_or(now + Duration::from_secs(86_400));
        let mut state = self.state.lock();
        for token in tokens {
            let id = entry_of_seq(token.get());
            state.outstanding.remove(&id);
            state.delayed.retain(|(_, held)| *held != id);
            state.delayed.push((due, id));
        }
        Ok(())
    }

    fn extend(&self, tokens: &[AckToken]) -> Result<(), ProviderError> {
        self.check_open("extend")?;
        // Only what the member still holds: an entry given back (nak) keeps the idle time the
        // nak gave it, so the other members may take it.
        let held: Vec<AckToken> = {
            let state = self.state.lock();
            tokens.iter().copied().filter(|t| state.outstanding.contains(&entry_of_seq(t.get()))).collect()
        };
        self.touch("extend", &held, Duration::ZERO, None)
    }

    fn lost(&self) -> u64 {
        // Relaxed: a statistic, read alone.
        self.group_lost.load(Ordering::Relaxed)
    }

    fn set_filter(&self, patterns: &[Pattern]) -> Result<(), ProviderError> {
        self.check_open("set_filter")?;
        let set: PatternSet<()> = patterns.iter().map(|p| (p.clone(), ())).collect();
        *self.filter.lock() = Some(Arc::new(set));
        Ok(())
    }

    fn close(&self) -> Result<(), ProviderError> {
        // Release: pairs with the Acquire in `check_open`.
        if self.closed.swap(true, Ordering::Release) {
            return Ok(());
        }
        Counters::sub_one(&self.shared.counters.open_sources);
        if self.shared.check_open("close").is_err() {
            return Ok(());
        }
        if self.shared_group {
            self.release_held()?;
        }
        // A member that holds nothing leaves the group, so members that come and go (generated
        // names) do not pile up in it. One that holds entries stays: its next incarnation (fan-out)
        // or the other members (shared, once they claimed what it released) need them, and the
        // sweeps remove it once it holds nothing.
        let mut call = Call::new(&self.shared.scripts.delete_consumer, &[&self.shared.keys.stream]);
        call.arg(&self.group).arg(&self.consumer);
        self.shared.pool.run("close", &self.group, |conn| call.invoke::<i64>(conn))?;
        Ok(())
    }
}

impl Drop for RedisInbound {
    fn drop(&mut self) {
        // Dropped without close: a member that vanished. Its entries stay pending for the others
        // to claim after the idle time, as for a crashed process.
        if !self.closed.swap(true, Ordering::Relaxed) {
            Counters::sub_one(&self.shared.counters.open_sources);
        }
    }
}

/// Creates `group` after entry `start` (`$`: the stream's current end), and the stream if need be;
/// an existing group is kept as it is. Returns the group's last delivered entry (see the
/// `CREATE_GROUP` script).
fn create_group(
    conn: &mut Connection,
    shared: &Shared,
    stream: &str,
    group: &str,
    start: &str,
) -> Result<String, RedisError> {
    let mut call = Call::new(&shared.scripts.create_group, &[stream]);
    call.arg(group).arg(start);
    call.invoke(conn)
}

/// Up to `count` ids pending in `consumer`, from `start` on.
fn pending_of(
    shared: &Shared,
    operation: &'static str,
    group: &str,
    consumer: &str,
    start: &str,
    count: usize,
) -> Result<Vec<String>, ProviderError> {
    let stream = &shared.keys.stream;
    let value: Value = shared.pool.run(operation, group, |conn| {
        redis::cmd("XPENDING").arg(stream).arg(group).arg(start).arg("+").arg(count).arg(consumer).query(conn)
    })?;
    let rows = reply::array(value).unwrap_or_default();
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            reply::array(row).and_then(|fields| fields.into_iter().next()).and_then(reply::string)
        })
        .collect())
}

/// Every entry pending in `consumer` now: at open, what its previous incarnation left
/// unacknowledged.
fn inherited_entries(
    shared: &Shared,
    operation: &'static str,
    group: &str,
    consumer: &str,
) -> Result<VecDeque<String>, ProviderError> {
    let mut all = VecDeque::new();
    let mut start = "-".to_owned();
    loop {
        let page = pending_of(shared, operation, group, consumer, &start, PENDING_PAGE)?;
        let full = page.len() == PENDING_PAGE;
        if let Some(last) = page.last() {
            start = format!("({last}");
        }
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

fn malformed_reply(error: reply::Malformed) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, "unexpected reply", error.0))
}

/// `{lost, {id, ms until due…}, {id, fields, deliveries}…}` from the claim script: entries found
/// deleted, entries a nak holds back still, and the entries handed out again.
fn claimed_entries(value: Value) -> Result<(usize, HeldBack, Claimed), reply::Malformed> {
    let mut items =
        reply::array(value).ok_or_else(|| reply::Malformed::new("claims are not an array"))?.into_iter();
    let lost = items.next().as_ref().and_then(reply::int).unwrap_or(0);
    let mut held = Vec::new();
    let mut pairs = items.next().and_then(reply::array).unwrap_or_default().into_iter();
    while let (Some(id), Some(wait)) = (pairs.next(), pairs.next()) {
        let id = reply::string(id).ok_or_else(|| reply::Malformed::new("a held claim has no id"))?;
        let wait = reply::int(&wait).and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0);
        held.push((id, Duration::from_millis(wait)));
    }
    let claimed = items.map(claimed_entry).collect::<Result<Vec<_>, _>>()?;
    Ok((usize::try_from(lost).unwrap_or(0), held, claimed))
}

/// Entries handed out again, each with its delivery count.
type Claimed = Vec<(Entry, u32)>;

/// Entries a nak still holds back, each with how long until it is due.
type HeldBack = Vec<(String, Duration)>;

/// `{cursor, lost, {id, fields, deliveries}…}` from the abandoned-claim script.
fn abandoned_entries(value: Value) -> Result<(String, usize, Claimed), reply::Malformed> {
    let mut items =
        reply::array(value).ok_or_else(|| reply::Malformed::new("claims are not an array"))?.into_iter();
    let cursor =
        items.next().and_then(reply::string).ok_or_else(|| reply::Malformed::new("claims have no cursor"))?;
    let lost = items.next().as_ref().and_then(reply::int).unwrap_or(0);
    let claimed = items.map(claimed_entry).collect::<Result<Vec<_>, _>>()?;
    Ok((cursor, usize::try_from(lost).unwrap_or(0), claimed))
}

fn claimed_entry(value: Value) -> Result<(Entry, u32), reply::Malformed> {
    let mut parts =
        reply::array(value).ok_or_else(|| reply::Malformed::new("a claim is not an array"))?.into_iter();
    let id =
        parts.next().and_then(reply::string).ok_or_else(|| reply::Malformed::new("a claim has no id"))?;
    let fields = parts.next().and_then(reply::pairs).unwrap_or_default();
    let deliveries = parts.next().as_ref().and_then(reply::int).unwrap_or(2);
    Ok((Entry { id, fields }, u32::try_from(deliveries).unwrap_or(u32::MAX)))
}

/// The entries of an `XREADGROUP` reply (`[[stream, [[id, fields]…]]]`, or nil on timeout).
fn new_entries(value: Value) -> Result<Vec<Entry>, reply::Malformed> {
    let mut out = Vec::new();
    for stream in reply::array(value).ok_or_else(|| reply::Malformed::new("a read is not an array"))? {
        let mut parts = reply::array(stream).unwrap_or_default().into_iter();
        let entries = parts.nth(1).and_then(reply::array).unwrap_or_default();
        for entry in entries {
            out.push(Entry::decode(entry).ok_or_else(|| reply::Malformed::new("a stream entry has no id"))?);
        }
    }
    Ok(out)
}
