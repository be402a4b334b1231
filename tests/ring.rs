//! Multi-threaded tests of the shard ring buffer: many producers, closes racing pushes.
//!
//! The ring is internal; these reach it through `eventbroker::__private`.

use std::collections::{HashSet, VecDeque};
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::__private::{Consumer, Producer, PushBatchError, PushError, WaitOutcome, ring};
use eventbroker::WaitStrategy;

/// A value tagged with its producer and that producer's sequence number.
type Tagged = (usize, u64);

/// Far beyond any run of these tests; only there so that a bug fails instead of hanging.
const GIVE_UP: Duration = Duration::from_secs(60);

/// Pushes `value` until it is accepted (`true`) or the ring is closed (`false`).
fn push_until_accepted(producer: &Producer<Tagged>, mut value: Tagged) -> bool {
    loop {
        match producer.try_push(value) {
            Ok(()) => return true,
            Err(PushError::Full(back)) => {
                value = back;
                thread::yield_now();
            }
            Err(PushError::Closed(_)) => return false,
        }
    }
}

/// Pushes all of `values` in batches until all are accepted or the ring is closed; returns how
/// many were accepted (a prefix).
fn push_batch_until_accepted(producer: &Producer<Tagged>, values: &mut VecDeque<Tagged>) -> usize {
    let total = values.len();
    while !values.is_empty() {
        match producer.try_push_batch(values) {
            Ok(_) => {}
            Err(PushBatchError::Full) => thread::yield_now(),
            Err(PushBatchError::Closed) => break,
        }
    }
    total - values.len()
}

/// Drains the ring the way a shard worker does, until it is closed and empty.
fn drain(mut consumer: Consumer<Tagged>, strategy: WaitStrategy) -> Vec<Tagged> {
    let deadline = Instant::now() + GIVE_UP;
    let mut seen = Vec::new();
    loop {
        if consumer.pop_batch(&mut seen, 32) > 0 {
            continue;
        }
        match consumer.wait(strategy, Some(deadline)) {
            WaitOutcome::Ready => {}
            WaitOutcome::Closed => return seen,
            WaitOutcome::TimedOut => panic!("the ring was never closed"),
        }
    }
}

#[test]
fn four_producers_each_item_once_in_producer_order() {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: u64 = 100_000;
    for strategy in [WaitStrategy::default(), WaitStrategy::Blocking { spins: 0, yields: 0 }] {
        let (producer, consumer) = ring::<Tagged>(64);
        let consumer = thread::spawn(move || drain(consumer, strategy));
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|id| {
                let producer = producer.clone();
                thread::spawn(move || {
                    if id % 2 == 0 {
                        for seq in 0..PER_PRODUCER {
                            assert!(push_until_accepted(&producer, (id, seq)));
                        }
                    } else {
                        // Batches of 1 to 17, so that they straddle the end of the buffer.
                        let mut seq = 0;
                        let mut batch = VecDeque::new();
                        while seq < PER_PRODUCER {
                            let end = (seq + 1 + seq % 17).min(PER_PRODUCER);
                            batch.extend((seq..end).map(|s| (id, s)));
                            let expected = usize::try_from(end - seq).unwrap();
                            assert_eq!(push_batch_until_accepted(&producer, &mut batch), expected);
                            seq = end;
                        }
                    }
                })
            })
            .collect();
        for handle in producers {
            handle.join().unwrap();
        }
        assert!(producer.close());
        let seen = consumer.join().unwrap();

        assert_eq!(seen.len(), PRODUCERS * usize::try_from(PER_PRODUCER).unwrap());
        let mut next = [0u64; PRODUCERS];
        for (id, seq) in seen {
            assert_eq!(seq, next[id], "producer {id}: expected {} next, got {seq}", next[id]);
            next[id] += 1;
        }
    }
}

#[test]
fn close_racing_pushes_strands_nothing() {
    const PRODUCERS: usize = 3;
    let mut rounds_with_pushes = 0;
    for round in 0..200u32 {
        let (producer, consumer) = ring::<Tagged>(8);
        let consumer = thread::spawn(move || drain(consumer, WaitStrategy::default()));
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|id| {
                let producer = producer.clone();
                thread::spawn(move || {
                    let mut accepted = Vec::new();
                    let mut seq = 0;
                    loop {
                        if id == 0 {
                            let mut batch: VecDeque<_> = (seq..seq + 3).map(|s| (id, s)).collect();
                            let taken = push_batch_until_accepted(&producer, &mut batch);
                            accepted.extend((seq..).take(taken).map(|s| (id, s)));
                            if taken < 3 {
                                return (accepted, batch.into_iter().collect::<Vec<_>>());
                            }
                            seq += 3;
                        } else {
                            if !push_until_accepted(&producer, (id, seq)) {
                                return (accepted, vec![(id, seq)]);
                            }
                            accepted.push((id, seq));
                            seq += 1;
                        }
                    }
                })
            })
            .collect();
        // Close at a different moment each round: from at once to a few hundred pushes in.
        for _ in 0..round * 50 {
            std::hint::spin_loop();
        }
        assert!(producer.close());

        let mut accepted = HashSet::new();
        let mut refused = HashSet::new();
        for handle in producers {
            let (ok, closed) = handle.join().unwrap();
            accepted.extend(ok);
            refused.extend(closed);
        }
        let seen = consumer.join().unwrap();
        let seen_set: HashSet<_> = seen.iter().copied().collect();
        assert_eq!(seen_set.len(), seen.len(), "round {round}: an item came out twice");
        assert_eq!(seen_set, accepted, "round {round}: accepted and drained differ");
        assert!(seen_set.is_disjoint(&refused), "round {round}: a refused item came out");
        assert!(producer.is_closed() && producer.is_empty());
        rounds_with_pushes += u32::from(!accepted.is_empty());
    }
    assert!(rounds_with_pushes > 0, "every close came before the first push: the race was never run");
}
