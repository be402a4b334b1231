//! The in-process bus: consumer groups over a log of the events stored since the first group
//! joined, so brokers that share one [`MemoryProvider`](super::MemoryProvider) receive each other's
//! events exactly as instances sharing a server do.
//!
//! The log holds each newly stored event once, as it was stored, with the group key of the broker
//! that stored it. A group keeps a cursor (the next log position it has not looked at) and the
//! events it handed out and has not had acknowledged (`pending`, by log position, which is also the
//! ack token). A fetch first hands out pending events that are due again — given back with a delay,
//! abandoned past the claim idle time, or left by the previous incarnation of a fan-out instance —
//! then new events past the cursor, skipping the group's own (echo) and those no member's filter
//! wants. The log keeps at most `max_events` entries (the provider's bound): a group that falls
//! further behind loses the oldest, counted as `bus_lost`. Entries every group has passed are
//! dropped at once. Everything happens under the bus's own lock, never a shard's; waiting fetchers
//! sleep on a [`Bell`] that stores ring.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::event::Event;
use crate::pattern::{Pattern, PatternSet};
use crate::provider::{AckToken, InboundConfig};

/// Identifies one opened source (one broker's membership) within the bus.
pub(super) type SourceId = u64;

/// One stored event in the log.
struct Logged {
    event: Arc<Event>,
    /// The group key of the broker that stored it, if a broker did.
    origin: Option<Arc<str>>,
}

/// The consumer groups of one provider, and the log they read.
pub(super) struct Bus {
    log: VecDeque<Logged>,
    /// Log position of `log[0]`.
    base: u64,
    /// Most entries the log keeps.
    max_log: usize,
    groups: HashMap<String, Group>,
    next_source: SourceId,
    /// Events handed out again after a nak, a claim or a restart.
    pub(super) redelivered: u64,
    /// Events skipped because their origin was the fetching group.
    pub(super) echoes_skipped: u64,
    /// Events skipped because no member's filter wanted them.
    pub(super) filtered: u64,
    /// Events a group lost because the log dropped them before the group read them.
    pub(super) lost: u64,
    /// Events handed out, redeliveries included.
    pub(super) handed_out: u64,
}

struct Group {
    /// Whether several brokers share it (work-queue); fan-out groups have one live member.
    shared: bool,
    /// The next log position the group has not looked at.
    cursor: u64,
    pending: BTreeMap<u64, Pending>,
    /// The open sources: one leaves when it closes, or when a fan-out instance joins again.
    members: HashMap<SourceId, Member>,
    /// Its part of [`Bus::lost`].
    lost: u64,
}

struct Pending {
    owner: SourceId,
    handed_at: Instant,
    /// Set by a nak or a takeover: from then on any member may take it.
    available_at: Option<Instant>,
    deliveries: u32,
}

struct Member {
    /// `None` until the first `set_filter`: everything is wanted.
    filter: Option<PatternSet<()>>,
    claim_idle: Duration,
}

impl Group {
    /// Whether a member wants events of `event_type`; with no member open (an instance that
    /// shut down, to come back later), every type is.
    fn wants(&self, event_type: &str) -> bool {
        self.members.is_empty() || self.members.values().any(|m| m.wants(event_type))
    }
}

impl Member {
    fn wants(&self, event_type: &str) -> bool {
        self.filter.as_ref().is_none_or(|set| set.is_match(event_type))
    }
}

/// One event a fetch hands out.
pub(super) struct Handout {
    pub(super) position: u64,
    pub(super) event: Arc<Event>,
    pub(super) deliveries: u32,
}

/// What a fetch found: the events, and when the next pending event becomes due again (so the
/// fetcher knows how long it may sleep).
pub(super) struct Fetched {
    pub(super) events: Vec<Handout>,
    pub(super) next_due: Option<Instant>,
}

impl Bus {
    pub(super) fn new(max_log: usize) -> Self {
        Self {
            log: VecDeque::new(),
            base: 0,
            max_log,
            groups: HashMap::new(),
            next_source: 0,
            redelivered: 0,
            echoes_skipped: 0,
            filtered: 0,
            lost: 0,
            handed_out: 0,
        }
    }

    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    /// Logs newly stored events; `true` when some group may want them (one they did not come from).
    pub(super) fn append<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a Arc<Event>>,
        origin: Option<&str>,
    ) -> bool {
        let origin: Option<Arc<str>> = origin.map(Arc::from);
        let before = self.log.len();
        self.log.extend(
            events.into_iter().map(|event| Logged { event: Arc::clone(event), origin: origin.clone() }),
        );
        if self.log.len() == before {
            return false;
        }
        self.trim();
        self.groups.keys().any(|key| Some(key.as_str()) != origin.as_deref())
    }

    /// Drops log entries no group needs any more, and the oldest beyond the bound.
    fn trim(&mut self) {
        let needed = self
            .groups
            .values()
            .map(|g| g.pending.keys().next().map_or(g.cursor, |&first| first.min(g.cursor)))
            .min()
            .unwrap_or_else(|| self.end());
        while self.base < needed && self.log.pop_front().is_some() {
            self.base += 1;
        }
        while self.log.len() > self.max_log
            && let Some(dropped) = self.log.pop_front()
        {
            let position = self.base;
            self.base += 1;
            // Counted as the groups that had not looked at it yet would have: their own events
            // are echoes and those no member wants are filtered, not lost.
            for (key, group) in &mut self.groups {
                if group.cursor > position {
                    continue;
                }
                group.cursor = self.base;
                if dropped.origin.as_deref() == Some(key.as_str()) {
                    self.echoes_skipped += 1;
                } else if group.wants(&dropped.event.event_type) {
                    self.lost += 1;
                    group.lost += 1;
                } else {
                    self.filtered += 1;
                }
            }
        }
        let base = self.base;
        for group in self.groups.values_mut() {
            debug_assert!(group.cursor >= base, "a cursor behind the log is moved on as it is trimmed");
            let kept = group.pending.split_off(&base);
            self.lost += group.pending.len() as u64;
            group.lost += group.pending.len() as u64;
            group.pending = kept;
        }
    }

    /// Joins `config`'s group (creating it at the log's current end) and returns the new source.
    /// A fan-out instance that joins again takes over what its predecessor left unacknowledged.
    pub(super) fn join(&mut self, config: &InboundConfig, now: Instant) -> SourceId {
        let id = self.next_source;
        self.next_source += 1;
        let end = self.end();
        let group = self.groups.entry(config.group().key()).or_insert_with(|| Group {
            shared: config.group().is_shared(),
            cursor: end,
            pending: BTreeMap::new(),
            members: HashMap::new(),
            lost: 0,
        });
        if !group.shared {
            // A fan-out group has one live member: a new one is the instance restarted.
            // The one it replaces fetches nothing more.
            group.members.clear();
            for pending in group.pending.values_mut() {
                pending.available_at = Some(now);
            }
        }
        group.members.insert(id, Member { filter: None, claim_idle: config.claim_idle() });
        id
    }

    /// Deletes the group `key`, with what its members left pending; `Ok(false)` when there is
    /// none, and the reason when a member is open.
    pub(super) fn remove_group(&mut self, key: &str) -> Result<bool, String> {
        let Some(group) = self.groups.get(key) else { return Ok(false) };
        if !group.members.is_empty() {
            return Err(format!("consumer group {key:?} has an open member: shut its broker down first"));
        }
        self.groups.remove(key);
        // What only this group still needed goes.
        self.trim();
        Ok(true)
    }

    /// Leaves a group: the member's unacknowledged events are due again at once.
    pub(super) fn leave(&mut self, group: &str, source: SourceId, now: Instant) {
        let Some(group) = self.groups.get_mut(group) else { return };
        group.members.remove(&source);
        for pending in group.pending.values_mut().filter(|p| p.owner == source) {
            pending.available_at = Some(now);
        }
    }

    /// A member that vanished without leaving (its source dropped unclosed, as a process that
    /// crashed): no longer a member, while its unacknowledged events stay its own until their
    /// claims lapse.
    pub(super) fn vanish(&mut self, group: &str, source: SourceId) {
        if let Some(group) = self.groups.get_mut(group) {
            group.members.remove(&source);
        }
    }

    pub(super) fn set_filter(&mut self, group: &str, source: SourceId, patterns: &[Pattern]) {
        let Some(member) = self.groups.get_mut(group).and_then(|g| g.members.get_mut(&source)) else {
            return;
        };
        member.filter = Some(patterns.iter().map(|p| (p.clone(), ())).collect());
    }

    /// Hands out up to `max` events to `source`: pending events due again, then new ones.
    pub(super) fn fetch(&mut self, group_key: &str, source: SourceId, max: usize, now: Instant) -> Fetched {
        let mut fetched = Fetched { events: Vec::new(), next_due: None };
        let base = self.base;
        let Some(group) = self.groups.get_mut(group_key) else { return fetched };
        let Some(member) = group.members.get(&source) else { return fetched };

        for (&position, pending) in &mut group.pending {
            if fetched.events.len() >= max {
                break;
            }
            let due = match pending.available_at {
                Some(at) => at,
                None if pending.owner == source => continue,
                None => crate::deadline::after(pending.handed_at, member.claim_idle),
            };
            if due > now {
                fetched.next_due = Some(fetched.next_due.map_or(due, |d: Instant| d.min(due)));
                continue;
            }
            let Some(logged) = usize::try_from(position - base).ok().and_then(|i| self.log.get(i)) else {
                continue; // Trimmed: counted as lost by `trim`.
            };
            if group.shared && pending.owner == source && !member.wants(&logged.event.event_type) {
                // Given back by this member for a pattern it no longer wants: left to the other
                // members (taken back, it would be acknowledged as unwanted), as PostgreSQL does.
                continue;
            }
            pending.owner = source;
            pending.handed_at = now;
            pending.available_at = None;
            pending.deliveries = pending.deliveries.saturating_add(1);
            self.redelivered += 1;
            fetched.events.push(Handout {
                position,
                event: Arc::clone(&logged.event),
                deliveries: pending.deliveries,
            });
        }

        let mut position = group.cursor;
        let start = usize::try_from(group.cursor - base).unwrap_or(usize::MAX);
        for logged in self.log.iter().skip(start) {
            if fetched.events.len() >= max {
                break;
            }
            let at = position;
            position += 1;
            if logged.origin.as_deref() == Some(group_key) {
                self.echoes_skipped += 1;
                continue;
            }
            let wanted = group.wants(&logged.event.event_type);
            if !wanted {
                self.filtered += 1;
                continue;
            }
            group
                .pending
                .insert(at, Pending { owner: source, handed_at: now, available_at: None, deliveries: 1 });
            fetched.events.push(Handout { position: at, event: Arc::clone(&logged.event), deliveries: 1 });
        }
        group.cursor = position;
        self.handed_out += fetched.events.len() as u64;
        self.trim();
        fetched
    }

    pub(super) fn ack(&mut self, group: &str, tokens: impl IntoIterator<Item = AckToken>) {
        let Some(group) = self.groups.get_mut(group) else { return };
        for token in tokens {
            group.pending.remove(&token.get());
        }
        self.trim();
    }

    /// Gives `source`'s events back, due at `due`. One another member has taken since (its claim
    /// lapsed) is left to that member: made due again, it would be handled twice at once.
    pub(super) fn nak(&mut self, group: &str, source: SourceId, tokens: &[AckToken], due: Instant) {
        let Some(group) = self.groups.get_mut(group) else { return };
        for token in tokens {
            if let Some(pending) = group.pending.get_mut(&token.get()).filter(|p| p.owner == source) {
                pending.available_at = Some(due);
            }
        }
    }

    pub(super) fn extend(&mut self, group: &str, source: SourceId, tokens: &[AckToken], now: Instant) {
        let Some(group) = self.groups.get_mut(group) else { return };
        for token in tokens {
            if let Some(pending) = group.pending.get_mut(&token.get()).filter(|p| p.owner == source) {
                pending.handed_at = now;
            }
        }
    }

    /// Open sources, over every group.
    pub(super) fn open_sources(&self) -> usize {
        self.groups.values().map(|g| g.members.len()).sum()
    }

    /// Events handed out and not yet acknowledged, over every group.
    pub(super) fn pending(&self) -> usize {
        self.groups.values().map(|g| g.pending.len()).sum()
    }

    /// What the group `key` lost (see [`Bus::lost`]); 0 for no such group.
    pub(super) fn lost_by(&self, key: &str) -> u64 {
        self.groups.get(key).map_or(0, |g| g.lost)
    }

    /// Entries in the log now.
    pub(super) fn logged(&self) -> usize {
        self.log.len()
    }
}

/// Wakes fetchers waiting for new events. A counter under a mutex, so a fetcher that read it
/// before looking for events and then waits for it to change cannot miss a ring in between.
#[derive(Default)]
pub(super) struct Bell {
    rung: Mutex<u64>,
    ringing: Condvar,
}

impl Bell {
    pub(super) fn count(&self) -> u64 {
        *self.rung.lock()
    }

    pub(super) fn ring(&self) {
        *self.rung.lock() += 1;
        self.ringing.notify_all();
    }

    /// Waits until the bell has rung since `seen` was read, or `until` passes.
    pub(super) fn wait(&self, seen: u64, until: Instant) {
        let mut rung = self.rung.lock();
        while *rung == seen {
            if self.ringing.wait_until(&mut rung, until).timed_out() {
                return;
            }
        }
    }
}
