//! Batching policies.
//!
//! A policy is plain state with pure methods driven by the time passed in (`now`), as in
//! text-generation-inference's queue: tests drive it directly; the stage's batcher thread in
//! [`crate::pipeline`] only wires it to the channel and the clock. This policy is
//! [`FixedPolicy`] (dispatch at `max_batch` frames or `max_wait` after the first one queued, as
//! Triton's dynamic batcher and DeepStream's batched-push-timeout do); deadline-aware policies
//! implement the same [`BatchPolicy`] trait.

use std::collections::VecDeque;

use crate::clock::Nanos;

/// Something that carries a deadline.
pub trait Deadline {
    /// The time by which it must be done.
    fn deadline(&self) -> Nanos;
}

impl Deadline for crate::frame::Frame {
    fn deadline(&self) -> Nanos {
        self.deadline
    }
}

/// A batching policy: what to dispatch, and when to look again.
pub trait BatchPolicy<T>: Send {
    /// Queues an item that arrived at `now`.
    fn push(&mut self, item: T, now: Nanos);
    /// Items whose deadline has passed at `now`, removed from the queue (to be dropped late).
    fn take_late(&mut self, now: Nanos) -> Vec<T>;
    /// The batch to dispatch at `now`, if any. With `closing`, whatever is queued goes now.
    fn next_batch(&mut self, now: Nanos, closing: bool) -> Option<Vec<T>>;
    /// When `next_batch` may next return something without new arrivals.
    fn next_wakeup(&self) -> Option<Nanos>;
    /// Items queued.
    fn len(&self) -> usize;
    /// Whether nothing is queued.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Largest batch; the batcher pulls no more than this from its channel.
    fn max_batch(&self) -> usize;
}

/// Dispatch when `max_batch` items are queued, or `max_wait` after the oldest arrived.
#[derive(Debug)]
pub struct FixedPolicy<T> {
    /// Largest batch.
    max_batch: usize,
    /// Longest wait of the oldest item.
    max_wait: Nanos,
    /// Items with their arrival time, oldest first.
    queue: VecDeque<(T, Nanos)>,
}

impl<T> FixedPolicy<T> {
    /// A policy with these limits (`max_batch` at least 1).
    pub fn new(max_batch: usize, max_wait: Nanos) -> Self {
        Self {
            max_batch: max_batch.max(1),
            max_wait,
            queue: VecDeque::new(),
        }
    }
}

impl<T: Deadline + Send> BatchPolicy<T> for FixedPolicy<T> {
    fn push(&mut self, item: T, now: Nanos) {
        self.queue.push_back((item, now));
    }

    fn take_late(&mut self, now: Nanos) -> Vec<T> {
        if self.queue.iter().all(|(t, _)| t.deadline() > now) {
            return Vec::new();
        }
        let (late, keep): (Vec<_>, Vec<_>) =
            self.queue.drain(..).partition(|(t, _)| t.deadline() <= now);
        self.queue = keep.into();
        late.into_iter().map(|(t, _)| t).collect()
    }

    fn next_batch(&mut self, now: Nanos, closing: bool) -> Option<Vec<T>> {
        let (_, oldest) = self.queue.front()?;
        let due = now >= oldest.saturating_add(self.max_wait);
        if self.queue.len() >= self.max_batch || due || closing {
            let n = self.queue.len().min(self.max_batch);
            Some(self.queue.drain(..n).map(|(t, _)| t).collect())
        } else {
            None
        }
    }

    fn next_wakeup(&self) -> Option<Nanos> {
        self.queue
            .front()
            .map(|(_, at)| at.saturating_add(self.max_wait))
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::time::Duration;

    #[derive(Debug, PartialEq)]
    struct Item(u32, Nanos);
    impl Deadline for Item {
        fn deadline(&self) -> Nanos {
            self.1
        }
    }

    const MS: Nanos = 1_000_000;

    #[test]
    fn dispatches_when_full() {
        let mut p = FixedPolicy::new(3, 10 * MS);
        for i in 0..4 {
            p.push(Item(i, u64::MAX), 0);
        }
        let b = p.next_batch(0, false).unwrap();
        assert_eq!(
            b.iter().map(|i| i.0).collect::<Vec<_>>(),
            vec![0, 1, 2],
            "in arrival order"
        );
        assert_eq!(p.len(), 1);
        assert!(p.next_batch(0, false).is_none(), "one item, not yet due");
    }

    #[test]
    fn dispatches_a_partial_batch_after_max_wait_of_the_oldest() {
        let clock = ManualClock::new(0);
        let mut p = FixedPolicy::new(8, 10 * MS);
        p.push(Item(1, u64::MAX), clock.now());
        clock.advance(Duration::from_millis(4));
        p.push(Item(2, u64::MAX), clock.now());
        assert_eq!(p.next_wakeup(), Some(10 * MS));
        clock.advance(Duration::from_millis(5));
        assert!(p.next_batch(clock.now(), false).is_none(), "9 ms: not due");
        clock.advance(Duration::from_millis(1));
        assert_eq!(
            p.next_batch(clock.now(), false).unwrap().len(),
            2,
            "10 ms: due"
        );
        assert_eq!(p.next_wakeup(), None);
    }

    #[test]
    fn closing_flushes_in_batches_of_at_most_max_batch() {
        let mut p = FixedPolicy::new(2, 10 * MS);
        for i in 0..3 {
            p.push(Item(i, u64::MAX), 0);
        }
        assert_eq!(p.next_batch(0, true).unwrap().len(), 2);
        assert_eq!(p.next_batch(0, true).unwrap().len(), 1);
        assert!(p.next_batch(0, true).is_none());
    }

    #[test]
    fn late_items_are_removed_and_the_rest_keep_their_order() {
        let mut p = FixedPolicy::new(8, 10 * MS);
        p.push(Item(1, 5 * MS), 0);
        p.push(Item(2, 50 * MS), 0);
        p.push(Item(3, 6 * MS), 0);
        p.push(Item(4, 60 * MS), 0);
        assert!(p.take_late(4 * MS).is_empty());
        let late = p.take_late(6 * MS);
        assert_eq!(late, vec![Item(1, 5 * MS), Item(3, 6 * MS)]);
        let b = p.next_batch(20 * MS, false).unwrap();
        assert_eq!(b, vec![Item(2, 50 * MS), Item(4, 60 * MS)]);
    }
}
