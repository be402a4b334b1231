//! Recovery: redriving dead letters and replaying stored history, neither of which can lose what
//! it starts from.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use super::engine::{Engine, Store};
use crate::dispatch::delivery::{self, Inline, Job, Origin, Outbox, Tally};
use crate::dispatch::ring::PushBatchError as ReserveError;
use crate::dispatch::worker;
use crate::error::{BrokerError, DeliveryFailure, ProviderErrorKind};
use crate::provider::{DeadLetterFilter, DeadLetterId, ProviderExt, ReplayCursor};
use crate::{EventId, EventStatus, Pattern};

/// How long broker operations that read through the provider wait for the writer to flush.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replay waits for room in a shard: as long as it takes, in practice.
const REPLAY_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
/// Events fetched from the provider per replay call.
const REPLAY_PAGE: usize = 512;
/// Events a replay looks at before it reads how many the store holds, to bound itself by that.
const COUNT_STORE_AFTER: u64 = 4 * REPLAY_PAGE as u64;

/// What [`Broker::redrive`](crate::Broker::redrive) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveOutcome {
    /// Subscriptions the event was delivered to.
    pub delivered: usize,
    /// Deliveries that failed again (each is a new dead letter).
    pub failed: Vec<DeliveryFailure>,
    /// The new dead letters, one for each of [`failed`](Self::failed), in the same order.
    pub dead_letters: Vec<DeadLetterId>,
    /// The event's status written to the provider: `completed` when the event has no dead letter
    /// left, `failed` when a delivery failed again, `None` when nothing was written (status
    /// tracking is off, another delivery of the event still has a dead letter, the provider no
    /// longer holds the event (deleted, evicted or expired), the event is another instance's,
    /// whose status is its publisher's, or the letter is a replayed delivery's, which, as the
    /// replay, leaves the stored event's history alone).
    pub status: Option<EventStatus>,
}

/// What [`Broker::replay`](crate::Broker::replay) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Events published again.
    pub replayed: u64,
    /// Sequence of the last event replayed.
    pub last_seq: Option<u64>,
    /// Where a later replay goes on with this one (see [`ReplayReport::resume_from`]).
    resume: Option<ReplayCursor>,
}

impl ReplayReport {
    /// Where a later [`Broker::replay`](crate::Broker::replay) goes on with this one, to replay
    /// what has been stored since: after the last event it looked at, a replay from a time
    /// keeping its time (resuming from `last_seq + 1` by sequence would not).
    pub fn resume_from(&self) -> ReplayCursor {
        self.resume.unwrap_or_else(|| crate::ReplayFrom::Beginning.into())
    }
}

impl Engine {
    /// How many events a replay looks at, at most: about twice what the store holds now, or no
    /// bound when the provider cannot say (an error, or a count of 0 from one that counts nothing
    /// while its replay returned events).
    fn replay_budget(&self) -> u64 {
        match self.provider.stats() {
            Ok(stats) if stats.total_events == 0 => u64::MAX,
            Ok(stats) => stats.total_events.saturating_mul(2).saturating_add(REPLAY_PAGE as u64),
            Err(error) => {
                tracing::warn!(%error, "replay cannot read how many events are stored; it runs until it catches up");
                u64::MAX
            }
        }
    }

    pub(crate) fn redrive(&self, id: DeadLetterId) -> Result<RedriveOutcome, BrokerError> {
        // A synchronous call, as `publish_sync` is: shutdown waits for the redrive (its handlers,
        // its writes) before it closes the provider, and counts it while it runs; so does drain.
        let Some(_call) = self.begin_sync_call() else { return Err(BrokerError::Closed) };
        self.shared.writer.flush_for_read(FLUSH_TIMEOUT)?;
        let letter = self.provider.get_dead_letter(id)?.ok_or(BrokerError::NoSuchDeadLetter(id))?;
        // Held until the letter is replaced or deleted: a concurrent redrive of the event is refused.
        let Some(_claim) = self.shared.failing.claim(letter.event.id) else {
            return Err(BrokerError::StillHandling { event: letter.event.id });
        };
        // The event's final status, if it just settled, was handed to the writer before it left
        // `failing`: written before this redrive's.
        self.shared.writer.flush_for_read(FLUSH_TIMEOUT)?;
        // The id is of this broker's subscription only if it is this broker's run that wrote the
        // letter (ids are drawn from a random range per broker); the pattern must agree too.
        let targets = match self.shared.table.get(letter.subscription_id) {
            Some(subscription) if subscription.pattern.as_str() == letter.pattern => vec![subscription],
            _ => self.shared.table.live_with_pattern(&letter.pattern),
        };
        if targets.is_empty() {
            return Err(BrokerError::NoSubscriber { pattern: letter.pattern });
        }
        let mut event = letter.event.clone();
        event.clear_lifecycle();
        event.metadata.insert("redriven_from".into(), letter.id.to_string().into());
        let job = Job { event: Arc::new(event), origin: Origin::Replayed };
        let started = crate::clock::now();
        let mut outbox = Outbox::default();
        let mut tally = Tally::default();
        let mut outcome =
            RedriveOutcome { delivered: 0, failed: Vec::new(), dead_letters: Vec::new(), status: None };
        let mut gone = 0;
        for subscription in &targets {
            let inline = delivery::deliver_inline(
                &self.shared.table,
                subscription,
                &job.event,
                self.inline_rules(),
                &mut outbox,
                || self.shared.caller_stop(),
            );
            match inline {
                Inline::Delivered { attempts } => {
                    tally.delivered(attempts);
                    outcome.delivered += 1;
                }
                // A stream or acknowledged channel whose receiver was dropped: the subscription
                // ended now; the event reached nobody through it.
                Inline::Gone => gone += 1,
                Inline::Failed(failure) => {
                    outbox.give_up(&job, &failure, &mut tally);
                    outcome.failed.push(failure);
                }
            }
        }
        if gone == targets.len() {
            // Every subscriber it found was gone: nothing was delivered or written, and the letter
            // stays for a redrive once there is one again.
            return Err(BrokerError::NoSubscriber { pattern: letter.pattern });
        }
        // Handler failures, retries and new dead letters count as any delivery's do; the event
        // was counted as processed when it was first handled, and is not again.
        self.sync.add(&outbox.counts);
        // The letter goes only once what replaces it and the event's status are written: a
        // failure in between keeps it, and redriving it again delivers it again.
        if !outbox.dead_letters.is_empty() {
            self.provider.store_dead_letters(&outbox.dead_letters)?;
        }
        outcome.dead_letters = outbox.dead_letters.iter().map(|letter| letter.id).collect();
        // The stored status is the publishing broker's (as a worker leaves another instance's
        // event's status alone); an event no broker published, a captured row say, is its
        // receivers'. A replayed delivery's letter is history's: the replay wrote no status, and
        // neither does its redrive.
        let ours = letter.event.instance_id.is_empty() || letter.event.instance_id == self.instance_id;
        if self.track_status && ours && !letter.event.is_replay() {
            outcome.status = self.write_redriven_status(job.event.id, id, tally, started)?;
        }
        self.provider.delete_dead_letter(id)?;
        Ok(outcome)
    }

    /// Writes the status of an event the dead letter `redriven` delivered again, as its
    /// deliveries ended (`tally`): `failed` when one failed again; `completed` when none did and
    /// the event has no other dead letter (another subscription's failure of it may still wait
    /// for its redrive, and the event then stays `failed`). Returns the status written, if any.
    fn write_redriven_status(
        &self,
        event: EventId,
        redriven: DeadLetterId,
        tally: Tally,
        started: Timestamp,
    ) -> Result<Option<EventStatus>, BrokerError> {
        if !tally.failed() {
            // The redriven letter is still stored; any other one keeps the event failed.
            let letters = DeadLetterFilter::new().with_event_id(event).with_limit(2);
            if self.provider.list_dead_letters(&letters)?.iter().any(|letter| letter.id != redriven) {
                return Ok(None);
            }
        }
        // An event no longer stored (deleted, evicted, expired) has no status to write: a
        // provider would skip the update, or keep a status of an event it does not hold.
        match self.provider.get(event) {
            Ok(None) => return Ok(None),
            Ok(Some(_)) => {}
            Err(error) if error.kind() == &ProviderErrorKind::NotSupported => {}
            Err(error) => return Err(error.into()),
        }
        let update = tally.finished(event).with_processed_at(started);
        let status = update.status;
        self.provider.update_status_batch(&[update])?;
        Ok(Some(status))
    }

    pub(crate) fn replay(
        &self,
        from: ReplayCursor,
        pattern: Option<&str>,
    ) -> Result<ReplayReport, BrokerError> {
        let pattern = pattern.map(Pattern::parse).transpose()?;
        self.shared.writer.flush_for_read(FLUSH_TIMEOUT)?;
        // A handler's worker must not wait a day on a shard whose worker may be waiting on it.
        let patience = if worker::current(self.id).is_some() { self.patience() } else { Some(REPLAY_WAIT) };
        // Catching up with the store may never happen while publishers store faster than this
        // replays. Past its first pages it reads how many events the store holds (once, as
        // counting may scan the store), and looks at no more than about twice that: twice, so a
        // count that lags the store never cuts a replay on a quiet one short.
        let mut budget = u64::MAX;
        let mut looked_at = 0u64;
        let mut report = ReplayReport { resume: Some(from), ..ReplayReport::default() };
        let mut pages = self.provider.replay_pages(from, pattern.as_ref(), REPLAY_PAGE);
        while let Some(page) = pages.next() {
            // Shutdown does not wait for a replay, and may close the provider while it reads.
            let page = page.map_err(|error| {
                if self.intake.is_closed() && error.kind() == &ProviderErrorKind::Closed {
                    BrokerError::Closed
                } else {
                    BrokerError::ReplayInterrupted {
                        replayed: report.replayed,
                        resume_from: report.resume_from(),
                        error: Box::new(error),
                    }
                }
            })?;
            for stored in page {
                if looked_at == COUNT_STORE_AFTER {
                    budget = self.replay_budget().max(looked_at);
                }
                if looked_at == budget {
                    report.resume = Some(from.at_sequence(stored.seq));
                    return Ok(report);
                }
                looked_at += 1;
                let next = from.at_sequence(stored.seq + 1);
                let mut event = stored.event;
                event.clear_lifecycle();
                event.metadata.insert("replay".into(), true.into());
                let event = match self.admit(event) {
                    Ok(event) => event,
                    Err(
                        error @ (crate::PublishError::InvalidType { .. }
                        | crate::PublishError::InvalidMetadata { .. }),
                    ) => {
                        tracing::warn!(%error, seq = stored.seq, "replay skips a stored event that cannot be published");
                        report.resume = Some(next);
                        continue;
                    }
                    Err(_) => return Err(BrokerError::Closed),
                };
                let job = Job { event, origin: Origin::Replayed };
                match self.enqueue(job, patience, Store::No) {
                    Ok(()) => {}
                    Err((ReserveError::Closed, _)) => return Err(BrokerError::Closed),
                    Err((ReserveError::Full, _)) => {
                        return Err(BrokerError::ReplayFull {
                            replayed: report.replayed,
                            resume_from: from.at_sequence(stored.seq),
                        });
                    }
                }
                report.replayed += 1;
                report.last_seq = Some(stored.seq);
                report.resume = Some(next);
            }
            // Past the rows the provider passed over after the page's last event, if any.
            report.resume = Some(pages.cursor());
        }
        report.resume = Some(pages.cursor());
        Ok(report)
    }
}
