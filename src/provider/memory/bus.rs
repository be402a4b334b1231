//! The in-process bus: consumer groups over the memory provider's sequence index, so brokers that
//! share one [`MemoryProvider`](super::MemoryProvider) receive each other's events exactly as
//! instances sharing a server do.
//!
//! A group keeps a cursor (the next sequence number it has not looked at) and the events it handed
//! out and has not had acknowledged (`pending`, by sequence number). A fetch first hands out pending
//! events that are due again — given back with a delay, abandoned past the claim idle time, or left
//! by the previous incarnation of a fan-out instance — then new events past the cursor, skipping
//! the group's own (echo) and those no member's filter wants. Everything happens under the
//! provider's state lock; waiting fetchers sleep on a [`Bell`] that stores ring.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::event::Event;
use crate::pattern::{Pattern, PatternSet};
use crate::provider::{AckToken, InboundConfig};

/// Identifies one opened source (one broker's membership) within the bus.
pub(super) type SourceId = u64;

/// The consumer groups of one provider.
#[derive(Default)]
pub(super) struct Bus {
    groups: HashMap<String, Group>,
    next_source: SourceId,
    /// Events handed out again after a nak, a claim or a restart.
    pub(super) redelivered: u64,
    /// Events skipped because their origin was the fetching group.
    pub(super) echoes_skipped: u64,
    /// Events skipped because no member's filter wanted them.
    pub(super) filtered: u64,
    /// Pending events that were deleted, evicted or expired before they were acknowledged.
    pub(super) lost: u64,
    /// Events handed out, redeliveries included.
    pub(super) handed_out: u64,
}

struct Group {
    /// Whether several brokers share it (work-queue); fan-out groups have one live member.
    shared: bool,
    /// The next sequence number the group has not looked at.
    cursor: u64,
    pending: BTreeMap<u64, Pending>,
    members: HashMap<SourceId, Member>,
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
    open: bool,
    claim_idle: Duration,
}

impl Member {
    fn wants(&self, event_type: &str) -> bool {
        self.filter.as_ref().is_none_or(|set| set.is_match(event_type))
    }
}

/// What a group may hand out: an event stored under a sequence number, with its origin.
pub(super) trait Log {
    /// The stored event with sequence number `seq`, if it is still stored.
    fn get(&self, seq: u64) -> Option<(&Arc<Event>, Option<&str>)>;
    /// Stored events from `first` on, in sequence order.
    fn from(&self, first: u64) -> impl Iterator<Item = (u64, &Arc<Event>, Option<&str>)>;
    /// The sequence number the next stored event will get.
    fn next_seq(&self) -> u64;
}

/// One event a fetch hands out.
pub(super) struct Handout {
    pub(super) seq: u64,
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
    /// Joins `config`'s group (creating it at the log's current end) and returns the new source.
    /// A fan-out instance that joins again takes over what its predecessor left unacknowledged.
    pub(super) fn join(&mut self, config: &InboundConfig, log: &impl Log, now: Instant) -> SourceId {
        let id = self.next_source;
        self.next_source += 1;
        let group = self.groups.entry(config.group().key()).or_insert_with(|| Group {
            shared: config.group().is_shared(),
            cursor: log.next_seq(),
            pending: BTreeMap::new(),
            members: HashMap::new(),
        });
        if !group.shared {
            // A fan-out group has one live member: a new one is the instance restarted.
            for member in group.members.values_mut() {
                member.open = false;
            }
            for pending in group.pending.values_mut() {
                pending.available_at = Some(now);
            }
        }
        group.members.insert(id, Member { filter: None, open: true, claim_idle: config.claim_idle() });
        id
    }

    /// Leaves a group: the member's unacknowledged events are due again at once.
    pub(super) fn leave(&mut self, group: &str, source: SourceId, now: Instant) {
        let Some(group) = self.groups.get_mut(group) else { return };
        if let Some(member) = group.members.get_mut(&source) {
            member.open = false;
        }
        for pending in group.pending.values_mut().filter(|p| p.owner == source) {
            pending.available_at = Some(now);
        }
    }

    pub(super) fn set_filter(&mut self, group: &str, source: SourceId, patterns: &[Pattern]) {
        let Some(member) = self.groups.get_mut(group).and_then(|g| g.members.get_mut(&source)) else {
            return;
        };
        member.filter = Some(patterns.iter().map(|p| (p.clone(), ())).collect());
    }

    /// Hands out up to `max` events to `source`: pending events due again, then new ones.
    pub(super) fn fetch(
        &mut self,
        group_key: &str,
        source: SourceId,
        max: usize,
        log: &impl Log,
        now: Instant,
    ) -> Fetched {
        let mut fetched = Fetched { events: Vec::new(), next_due: None };
        let Some(group) = self.groups.get_mut(group_key) else { return fetched };
        let Some(claim_idle) = group.members.get(&source).map(|m| m.claim_idle) else { return fetched };

        let mut gone = Vec::new();
        for (&seq, pending) in &mut group.pending {
            if fetched.events.len() >= max {
                break;
            }
            let due = match pending.available_at {
                Some(at) => at,
                None if pending.owner == source => continue,
                None => pending.handed_at.checked_add(claim_idle).unwrap_or(pending.handed_at),
            };
            if due > now {
                fetched.next_due = Some(fetched.next_due.map_or(due, |d: Instant| d.min(due)));
                continue;
            }
            let Some((event, _)) = log.get(seq) else {
                gone.push(seq);
                continue;
            };
            pending.owner = source;
            pending.handed_at = now;
            pending.available_at = None;
            pending.deliveries = pending.deliveries.saturating_add(1);
            self.redelivered += 1;
            fetched.events.push(Handout { seq, event: as_published(event), deliveries: pending.deliveries });
        }
        for seq in gone {
            group.pending.remove(&seq);
            self.lost += 1;
        }

        let origin = group_key;
        let mut cursor = group.cursor;
        for (seq, event, from) in log.from(group.cursor) {
            if fetched.events.len() >= max {
                break;
            }
            cursor = seq + 1;
            if from == Some(origin) {
                self.echoes_skipped += 1;
                continue;
            }
            let wanted = group.members.values().filter(|m| m.open).any(|m| m.wants(&event.event_type));
            if !wanted {
                self.filtered += 1;
                continue;
            }
            group
                .pending
                .insert(seq, Pending { owner: source, handed_at: now, available_at: None, deliveries: 1 });
            fetched.events.push(Handout { seq, event: as_published(event), deliveries: 1 });
        }
        group.cursor = group.cursor.max(cursor);
        self.handed_out += fetched.events.len() as u64;
        fetched
    }

    pub(super) fn ack(&mut self, group: &str, tokens: impl IntoIterator<Item = AckToken>) {
        let Some(group) = self.groups.get_mut(group) else { return };
        for token in tokens {
            group.pending.remove(&token.get());
        }
    }

    pub(super) fn nak(&mut self, group: &str, tokens: &[AckToken], due: Instant) {
        let Some(group) = self.groups.get_mut(group) else { return };
        for token in tokens {
            if let Some(pending) = group.pending.get_mut(&token.get()) {
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
        self.groups.values().flat_map(|g| g.members.values()).filter(|m| m.open).count()
    }

    /// Events handed out and not yet acknowledged, over every group.
    pub(super) fn pending(&self) -> usize {
        self.groups.values().map(|g| g.pending.len()).sum()
    }

    /// Whether an event stored from `origin` may interest some group (one it did not come from).
    pub(super) fn interested(&self, origin: Option<&str>) -> bool {
        self.groups.keys().any(|key| Some(key.as_str()) != origin)
    }
}

/// The event as its publisher stored it: later status changes are the publisher's bookkeeping,
/// not part of what other instances receive.
fn as_published(event: &Arc<Event>) -> Arc<Event> {
    let e = &**event;
    let untouched = e.status == crate::EventStatus::Pending
        && e.error.is_empty()
        && e.retry_count == 0
        && e.processed_at.is_none()
        && e.completed_at.is_none();
    if untouched {
        return Arc::clone(event);
    }
    let mut copy = e.clone();
    copy.status = crate::EventStatus::Pending;
    copy.error.clear();
    copy.retry_count = 0;
    copy.processed_at = None;
    copy.completed_at = None;
    Arc::new(copy)
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
