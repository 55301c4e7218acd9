//! Batching policies.
//!
//! A policy is plain state with pure methods driven by the time passed in (`now`), as in
//! text-generation-inference's queue: tests drive it directly, and so can the simulator; the
//! stage's batcher thread in [`crate::pipeline`] only wires it to channels and the clock.
//!
//! - [`FixedPolicy`]: dispatch at `max_batch` frames or `max_wait` after the first one queued
//!   (Triton's dynamic batcher, DeepStream's batched-push-timeout).
//! - [`AimdPolicy`]: the batch size grows by one after an on-time batch and halves after a late
//!   one (Clipper).
//! - [`deadline::DeadlinePolicy`]: reservation-based adaptive batching (the default where the
//!   stage's latency is known): dispatch when full, or at the last moment a batch of what is
//!   queued can still meet the oldest frame's deadline through every remaining stage, reserving
//!   a slot on a worker of each of them first.

pub mod analytic;
pub mod cell;
pub mod deadline;
pub mod driver;
#[cfg(test)]
pub(crate) mod script;
pub mod thread;

use std::collections::VecDeque;

use serde::Deserialize;

use crate::clock::Nanos;

pub use driver::{
    Assigned, Driver, Load, PolicySettings, Step, make_policy, pick_worker, saturated,
};

/// Batching policy of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Dispatch at `max_batch` frames or `max_wait_ms` after the first.
    Fixed,
    /// Batch size +1 after an on-time batch, halved after a late one (Clipper).
    Aimd,
    /// Reservation-based: the largest batch whose whole route meets the oldest deadline, at the
    /// last moment it still does; reserves a worker of every following `deadline` stage.
    Deadline,
}

/// Something that carries a deadline.
pub trait Deadline {
    /// The time by which it must be done.
    fn deadline(&self) -> Nanos;
    /// The stream it belongs to: where not every queued item can be served, a policy shares
    /// what it serves among streams (everything is one stream by default).
    fn stream(&self) -> usize {
        0
    }
    /// Its stream's weight in that share (at least 1).
    fn weight(&self) -> u32 {
        1
    }
}

impl Deadline for crate::frame::Frame {
    fn deadline(&self) -> Nanos {
        self.deadline
    }
    fn stream(&self) -> usize {
        self.stream
    }
    fn weight(&self) -> u32 {
        self.priority
    }
}

/// One reserved step of a batch's route: a worker of a stage, from `start` to `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// Stage index in the pipeline.
    pub stage: usize,
    /// Worker index in the stage's pool.
    pub worker: usize,
    /// When the batch has reached the worker: the end of its transfer over the worker's own
    /// link where the stage receives while computing, else when it is handed over (at or before
    /// `start`).
    pub arrived: Nanos,
    /// Reserved start.
    pub start: Nanos,
    /// Reserved end: when the worker is free again (start + profiled latency, plus the
    /// transfer unless the stage sends while computing).
    pub end: Nanos,
    /// When the batch reaches the next stage (`end`, unless the stage sends while computing).
    pub sent: Nanos,
}

/// What a policy hands to its stage: the items, and for reservation-based policies the route
/// (first hop: this stage) that every later stage must follow.
#[derive(Debug)]
pub struct Dispatch<T> {
    /// The batch, in queue order.
    pub items: Vec<T>,
    /// Reserved route, if the policy reserves one.
    pub route: Option<Vec<Hop>>,
}

impl<T> Dispatch<T> {
    /// A batch without a reserved route.
    pub fn unrouted(items: Vec<T>) -> Self {
        Self { items, route: None }
    }
}

/// A batching policy: what to dispatch, and when to look again.
pub trait BatchPolicy<T>: Send {
    /// Queues an item that arrived at `now`.
    fn push(&mut self, item: T, now: Nanos);
    /// Items that can no longer meet their deadline at `now`, removed from the queue (to be
    /// dropped late).
    fn take_late(&mut self, now: Nanos) -> Vec<T>;
    /// The batch to dispatch at `now`, if any. With `closing`, whatever is queued goes now.
    fn next_batch(&mut self, now: Nanos, closing: bool) -> Option<Dispatch<T>>;
    /// When `next_batch` may next return something without new arrivals.
    fn next_wakeup(&self) -> Option<Nanos>;
    /// Items queued.
    fn len(&self) -> usize;
    /// Whether nothing is queued.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Largest batch.
    fn max_batch(&self) -> usize;
    /// Items the batcher holds at most: it pulls no more from its channel (by default, a
    /// batch).
    fn holds(&self) -> usize {
        self.max_batch()
    }
    /// Whether a dispatched batch finished by the earliest deadline in it.
    fn feedback(&mut self, _on_time: bool) {}
    /// Whether `next_batch` can find items late that `take_late` just before, at the same time,
    /// did not (a policy that reserves routes learns it then); the driver asks again only then.
    fn finds_late_when_batching(&self) -> bool {
        false
    }
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
    /// Limits set while running (analytic batching), read at each decision.
    knob: Option<std::sync::Arc<driver::Knob>>,
}

impl<T> FixedPolicy<T> {
    /// A policy with these limits (`max_batch` at least 1).
    pub fn new(max_batch: usize, max_wait: Nanos) -> Self {
        Self {
            max_batch: max_batch.max(1),
            max_wait,
            queue: VecDeque::new(),
            knob: None,
        }
    }

    /// The same, its limits read from `knob` at each decision (`max_batch` stays the bound).
    pub fn with_knob(mut self, knob: Option<std::sync::Arc<driver::Knob>>) -> Self {
        self.knob = knob;
        self
    }

    fn limits(&self) -> (usize, Nanos) {
        match &self.knob {
            Some(k) => {
                let (b, w) = k.get();
                (b.clamp(1, self.max_batch), w)
            }
            None => (self.max_batch, self.max_wait),
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

    fn next_batch(&mut self, now: Nanos, closing: bool) -> Option<Dispatch<T>> {
        let (max_batch, max_wait) = self.limits();
        let (_, oldest) = self.queue.front()?;
        let due = now >= oldest.saturating_add(max_wait);
        if self.queue.len() >= max_batch || due || closing {
            let n = self.queue.len().min(max_batch);
            Some(Dispatch::unrouted(
                self.queue.drain(..n).map(|(t, _)| t).collect(),
            ))
        } else {
            None
        }
    }

    fn next_wakeup(&self) -> Option<Nanos> {
        let (_, max_wait) = self.limits();
        self.queue
            .front()
            .map(|(_, at)| at.saturating_add(max_wait))
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn max_batch(&self) -> usize {
        self.limits().0
    }
}

/// Clipper's additive-increase, multiplicative-decrease batch sizing on top of [`FixedPolicy`]:
/// the batch size grows by one after an on-time batch and halves after a late one, between 1 and
/// `max_batch`; a partial batch still goes after `max_wait`.
#[derive(Debug)]
pub struct AimdPolicy<T> {
    /// Queue and size-or-wait dispatch, with the current target as its batch size.
    inner: FixedPolicy<T>,
    /// Upper bound of the target.
    max_batch: usize,
}

impl<T> AimdPolicy<T> {
    /// Starts at batch size 1.
    pub fn new(max_batch: usize, max_wait: Nanos) -> Self {
        Self {
            inner: FixedPolicy::new(1, max_wait),
            max_batch: max_batch.max(1),
        }
    }

    /// The batch size it aims for now.
    pub fn target(&self) -> usize {
        self.inner.max_batch
    }
}

impl<T: Deadline + Send> BatchPolicy<T> for AimdPolicy<T> {
    fn push(&mut self, item: T, now: Nanos) {
        self.inner.push(item, now);
    }
    fn take_late(&mut self, now: Nanos) -> Vec<T> {
        self.inner.take_late(now)
    }
    fn next_batch(&mut self, now: Nanos, closing: bool) -> Option<Dispatch<T>> {
        self.inner.next_batch(now, closing)
    }
    fn next_wakeup(&self) -> Option<Nanos> {
        self.inner.next_wakeup()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn max_batch(&self) -> usize {
        // Pull up to the ceiling so that a grown target finds frames waiting.
        self.max_batch
    }
    fn feedback(&mut self, on_time: bool) {
        let t = self.inner.max_batch;
        self.inner.max_batch = if on_time {
            (t + 1).min(self.max_batch)
        } else {
            (t / 2).max(1)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::time::Duration;

    use crate::batcher::script::{Item, MS};

    #[test]
    fn dispatches_when_full() {
        let mut p = FixedPolicy::new(3, 10 * MS);
        for i in 0..4 {
            p.push(Item(i, u64::MAX), 0);
        }
        let b = p.next_batch(0, false).unwrap().items;
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
            p.next_batch(clock.now(), false).unwrap().items.len(),
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
        assert_eq!(p.next_batch(0, true).unwrap().items.len(), 2);
        assert_eq!(p.next_batch(0, true).unwrap().items.len(), 1);
        assert!(p.next_batch(0, true).is_none());
    }

    #[test]
    fn aimd_grows_by_one_and_halves() {
        let mut p: AimdPolicy<Item> = AimdPolicy::new(8, 10 * MS);
        assert_eq!(p.target(), 1);
        for _ in 0..5 {
            BatchPolicy::<Item>::feedback(&mut p, true);
        }
        assert_eq!(p.target(), 6);
        BatchPolicy::<Item>::feedback(&mut p, false);
        assert_eq!(p.target(), 3);
        for _ in 0..10 {
            BatchPolicy::<Item>::feedback(&mut p, true);
        }
        assert_eq!(p.target(), 8, "capped at max_batch");
        for _ in 0..5 {
            BatchPolicy::<Item>::feedback(&mut p, false);
        }
        assert_eq!(p.target(), 1, "never below 1");
        // The target is the batch size: 3 queued with target 2 -> a batch of 2 at once.
        BatchPolicy::<Item>::feedback(&mut p, true);
        for i in 0..3 {
            p.push(Item(i, u64::MAX), 0);
        }
        assert_eq!(p.next_batch(0, false).unwrap().items.len(), 2);
        assert!(p.next_batch(MS, false).is_none());
        assert_eq!(
            p.next_batch(10 * MS, false).unwrap().items.len(),
            1,
            "partial batch after max_wait"
        );
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
        let b = p.next_batch(20 * MS, false).unwrap().items;
        assert_eq!(b, vec![Item(2, 50 * MS), Item(4, 60 * MS)]);
    }
}
