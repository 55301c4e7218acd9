//! The one batcher driver: what every stage's batcher does at a moment in time, as a pure step
//! over a policy.
//!
//! A step takes the time and the load of the stage's workers and answers three questions: which
//! queued items can no longer meet their deadline (drop them late), which batch goes now and to
//! which worker, and when to look again. The runtime's batcher thread ([`super::thread`]), the
//! simulator ([`crate::sim`]) and the policy tests all drive stages through it, so they choose
//! batches and workers the same way; only how they wait (a channel and the system clock, or an
//! event queue on a virtual clock) differs.

use std::sync::{Arc, Mutex};

use super::deadline::{DeadlineConfig, DeadlinePolicy, StageCost, Timeline};
use super::{AimdPolicy, BatchPolicy, Deadline, FixedPolicy, Hop, PolicyKind};
use crate::clock::Nanos;

/// Batches a worker's channel holds besides the one it runs (the simulator models the same).
pub const WORKER_QUEUE: usize = 2;

/// Batches a worker holds at most: the one running and a full channel.
pub const WORKER_DEPTH: usize = WORKER_QUEUE + 1;

/// A stage's batching settings, from a pipeline file or a plan.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// Which policy.
    pub kind: PolicyKind,
    /// Index of the stage in its pipeline (the deadline policy's head stage).
    pub stage: usize,
    /// Largest batch (for `deadline`: the planned batch size).
    pub max_batch: usize,
    /// Longest wait of the oldest item (`fixed`, `aimd`).
    pub max_wait: Nanos,
    /// Safety margin of the `deadline` policy.
    pub margin: Nanos,
    /// Costs of this stage and of every following stage whose route it reserves (`deadline`).
    /// Empty: the stage's latency is unknown, and a `deadline` stage batches as `fixed`.
    pub costs: Vec<StageCost>,
    /// `fixed` stages whose limits are chosen while running: where the policy reads them.
    pub knob: Option<Arc<Knob>>,
}

/// A `fixed` stage's batch limits, set while it runs (analytic batching) and read by its policy
/// at each decision.
#[derive(Debug)]
pub struct Knob {
    batch: std::sync::atomic::AtomicUsize,
    wait: std::sync::atomic::AtomicU64,
}

impl Knob {
    /// Limits to start with.
    pub fn new(batch: usize, wait: Nanos) -> Knob {
        Knob {
            batch: batch.into(),
            wait: wait.into(),
        }
    }

    /// Sets both limits.
    pub fn set(&self, batch: usize, wait: Nanos) {
        use std::sync::atomic::Ordering::Relaxed;
        self.batch.store(batch, Relaxed);
        self.wait.store(wait, Relaxed);
    }

    /// `(max_batch, max_wait)`.
    pub fn get(&self) -> (usize, Nanos) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.batch.load(Relaxed), self.wait.load(Relaxed))
    }
}

/// The policy a stage's settings describe. `deadline` stages book their routes on `timeline`,
/// which the stage's workers (real or simulated) update when a batch finishes.
pub fn make_policy<T: Deadline + Send + 'static>(
    s: PolicySettings,
    timeline: Arc<Mutex<Timeline>>,
) -> Box<dyn BatchPolicy<T>> {
    match s.kind {
        PolicyKind::Deadline if !s.costs.is_empty() => Box::new(DeadlinePolicy::new(
            DeadlineConfig {
                stage: s.stage,
                costs: s.costs,
                planned: s.max_batch,
                margin: s.margin,
            },
            timeline,
        )),
        PolicyKind::Aimd => Box::new(AimdPolicy::new(s.max_batch, s.max_wait)),
        _ => Box::new(FixedPolicy::new(s.max_batch, s.max_wait).with_knob(s.knob)),
    }
}

/// Batches in flight per worker of a stage, read only when a batch needs a worker.
pub trait Load {
    /// Workers of the stage.
    fn workers(&self) -> usize;
    /// Batches sent to `worker` and not finished.
    fn of(&self, worker: usize) -> usize;
}

impl Load for [usize] {
    fn workers(&self) -> usize {
        self.len()
    }
    fn of(&self, worker: usize) -> usize {
        self[worker]
    }
}

impl<const N: usize> Load for [usize; N] {
    fn workers(&self) -> usize {
        N
    }
    fn of(&self, worker: usize) -> usize {
        self[worker]
    }
}

/// Whether every worker holds as many batches as it can. Whoever cannot block on a full worker
/// (the simulator) waits for one to finish.
pub fn saturated(load: &(impl Load + ?Sized)) -> bool {
    (0..load.workers()).all(|w| load.of(w) >= WORKER_DEPTH)
}

/// The worker a batch goes to: the first hop of its reserved route, else the worker with the
/// fewest batches in flight, ties broken round robin from the one after the last pick (`rotate`
/// keeps that position between calls).
pub fn pick_worker(
    route: Option<&[Hop]>,
    load: &(impl Load + ?Sized),
    rotate: &mut usize,
) -> usize {
    if let Some(hop) = route.and_then(|r| r.first()) {
        return hop.worker;
    }
    let n = load.workers().max(1);
    *rotate = (*rotate + 1) % n;
    (0..n)
        .map(|k| (*rotate + k) % n)
        .min_by_key(|w| if *w < load.workers() { load.of(*w) } else { 0 })
        .unwrap_or(0)
}

/// A batch assigned to a worker.
#[derive(Debug)]
pub struct Assigned<T> {
    /// The batch, in queue order.
    pub items: Vec<T>,
    /// The reserved route (first hop: this stage), if the policy reserves one.
    pub route: Option<Vec<Hop>>,
    /// The worker of this stage that runs it.
    pub worker: usize,
}

/// What one step decided.
#[derive(Debug)]
pub struct Step<T> {
    /// Items that can no longer meet their deadline, removed from the queue: drop them late.
    pub late: Vec<T>,
    /// The batch to send now, if any. Step again at once after a dispatch: more may be due.
    pub dispatch: Option<Assigned<T>>,
}

/// A stage's batcher: its policy and its worker choice.
pub struct Driver<T> {
    /// What to dispatch and when.
    policy: Box<dyn BatchPolicy<T>>,
    /// Round-robin position of the worker choice.
    rotate: usize,
}

impl<T> Driver<T> {
    /// A driver over `policy`.
    pub fn new(policy: Box<dyn BatchPolicy<T>>) -> Self {
        Self { policy, rotate: 0 }
    }

    /// Queues an item that arrived at `now`.
    pub fn push(&mut self, item: T, now: Nanos) {
        self.policy.push(item, now);
    }

    /// Items it takes before a batch is full (pull no more than this from the stage's queue).
    pub fn room(&self) -> usize {
        self.policy.holds().saturating_sub(self.policy.len())
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.policy.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.policy.is_empty()
    }

    /// Reports whether a dispatched batch finished by the earliest deadline in it.
    pub fn feedback(&mut self, on_time: bool) {
        self.policy.feedback(on_time);
    }

    /// When a step may next dispatch without new arrivals.
    pub fn next_wakeup(&self) -> Option<Nanos> {
        self.policy.next_wakeup()
    }

    /// One step at `now`: what is late, and what goes to which worker. With `closing` (no more
    /// items will come), whatever is queued goes, in batches of at most the policy's size.
    pub fn step(&mut self, now: Nanos, closing: bool, load: &(impl Load + ?Sized)) -> Step<T> {
        let mut late = self.policy.take_late(now);
        let dispatch = self.policy.next_batch(now, closing);
        // Reserving a route can show that other queued items can no longer make it.
        if self.policy.finds_late_when_batching() {
            late.extend(self.policy.take_late(now));
        }
        let dispatch = dispatch.map(|d| {
            let worker = pick_worker(d.route.as_deref(), load, &mut self.rotate);
            Assigned {
                items: d.items,
                route: d.route,
                worker,
            }
        });
        Step { late, dispatch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::batcher::script::{Item, MS};

    fn fixed(max_batch: usize, max_wait: Nanos) -> Driver<Item> {
        Driver::new(make_policy(
            PolicySettings {
                kind: PolicyKind::Fixed,
                stage: 0,
                max_batch,
                max_wait,
                margin: 0,
                costs: Vec::new(),
                knob: None,
            },
            Arc::new(Mutex::new(Timeline::new(&[1]))),
        ))
    }

    #[test]
    fn least_loaded_worker_ties_rotate() {
        let mut r = 0;
        assert_eq!(pick_worker(None, &[1, 0, 0], &mut r), 1);
        assert_eq!(
            pick_worker(None, &[1, 0, 0], &mut r),
            2,
            "tie: the next one"
        );
        assert_eq!(pick_worker(None, &[0, 0, 0], &mut r), 0);
        assert_eq!(pick_worker(None, &[3, 3, 1], &mut r), 2, "least load wins");
        let hop = Hop {
            stage: 0,
            worker: 1,
            arrived: 0,
            start: 0,
            end: 1,
            sent: 1,
        };
        assert_eq!(
            pick_worker(Some(&[hop]), &[0, 9, 0], &mut r),
            1,
            "a reserved route is followed"
        );
    }

    #[test]
    fn a_step_drops_late_items_and_assigns_the_batch() {
        let mut d = fixed(2, 10 * MS);
        d.push(Item(1, 5 * MS), 0);
        d.push(Item(2, 50 * MS), 0);
        d.push(Item(3, 60 * MS), 0);
        assert_eq!(d.room(), 0);
        let s = d.step(6 * MS, false, &[2, 0]);
        assert_eq!(s.late, vec![Item(1, 5 * MS)]);
        let a = s.dispatch.expect("two queued: a full batch");
        assert_eq!(a.items, vec![Item(2, 50 * MS), Item(3, 60 * MS)]);
        assert_eq!(a.worker, 1, "the idle worker");
        assert!(d.is_empty());
        assert_eq!(d.next_wakeup(), None);
    }

    #[test]
    fn closing_flushes_what_is_queued() {
        let mut d = fixed(4, 10 * MS);
        d.push(Item(1, u64::MAX), 0);
        assert!(d.step(MS, false, &[0]).dispatch.is_none(), "not yet due");
        assert_eq!(d.next_wakeup(), Some(10 * MS));
        let a = d.step(MS, true, &[0]).dispatch.expect("closing");
        assert_eq!(a.items.len(), 1);
    }

    #[test]
    fn saturation_is_every_worker_at_its_depth() {
        assert!(saturated(&[WORKER_DEPTH, WORKER_DEPTH]));
        assert!(!saturated(&[WORKER_DEPTH, WORKER_DEPTH - 1]));
    }
}
