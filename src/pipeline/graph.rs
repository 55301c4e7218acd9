//! The stage graph: each stage's bounded queue, its batcher thread and its pool of workers, and
//! how batches find a worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admission::Signal;
use crate::batcher::deadline::{StageCost, Timeline};
use crate::batcher::thread::{self, Inbox, Outbox, Recv};
use crate::batcher::{Assigned, Driver, Hop, Load, PolicyKind, PolicySettings, make_policy};
use crate::clock::{Clock, Nanos, SystemClock, nanos};
use crate::cluster::handoff::Releaser;
use crate::config::Pipeline;
use crate::frame::Frame;
use crate::stats::Stats;

/// A batch on its way to a worker, with the route reserved for it, if any.
pub(crate) struct Batch {
    /// Frames in queue order.
    pub frames: Vec<Frame>,
    /// Reserved hops (first: the stage it is sent to).
    pub route: Option<Vec<Hop>>,
    /// Dispatch number within the stage (set when sent), for putting outputs back in order.
    pub seq: u64,
}

/// Puts a stage's finished batches back in dispatch order, so that the frames of a stream leave
/// a stage in the order they entered it, whichever worker ran them.
pub(super) struct Sequencer<T> {
    /// The dispatch number to release next.
    next: u64,
    /// Finished out of order, by dispatch number.
    parked: BTreeMap<u64, T>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Self {
            next: 0,
            parked: BTreeMap::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// Records that batch `seq` finished with `out`; returns every output now due, in order
    /// (empty while an earlier batch is still running).
    pub fn finish(&mut self, seq: u64, out: T) -> Vec<T> {
        self.parked.insert(seq, out);
        let mut due = Vec::new();
        while let Some(o) = self.parked.remove(&self.next) {
            due.push(o);
            self.next += 1;
        }
        due
    }
}

/// The workers of a stage, as seen by whoever sends them batches.
#[derive(Clone)]
pub(super) struct Pool {
    /// One channel per worker.
    pub workers: Vec<flume::Sender<Batch>>,
    /// Batches sent to each worker and not finished.
    pub in_flight: Arc<Vec<AtomicUsize>>,
    /// Dispatch numbers of the stage.
    pub dispatched: Arc<AtomicU64>,
    /// Notified when the stage's batcher takes a frame or a worker lets go of a batch (what an
    /// admission waiting for room watches).
    pub room: Arc<Signal>,
    /// Workers that are unavailable (on a node that is down): least-loaded picking passes them.
    pub down: Arc<Vec<AtomicBool>>,
}

impl Pool {
    /// A pool of `n` workers with these channels.
    pub fn new(workers: Vec<flume::Sender<Batch>>) -> Self {
        let n = workers.len();
        Self {
            workers,
            in_flight: Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect()),
            dispatched: Arc::new(AtomicU64::new(0)),
            room: Arc::new(Signal::default()),
            down: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
        }
    }

    /// Sends a batch to worker `w` (blocking while its channel is full); gives the batch back
    /// when the worker is gone.
    pub fn send_to(&self, w: usize, mut batch: Batch) -> Result<(), Batch> {
        batch.seq = self.dispatched.fetch_add(1, Ordering::SeqCst);
        self.in_flight[w].fetch_add(1, Ordering::SeqCst);
        self.workers[w].send(batch).map_err(|flume::SendError(b)| {
            self.in_flight[w].fetch_sub(1, Ordering::SeqCst);
            b
        })
    }
}

/// Where a stage's output goes: the next stage's queue (or the publisher), and its pool for
/// batches with a reserved route.
#[derive(Clone)]
pub(super) struct Downstream {
    /// Frames one by one.
    pub queue: flume::Sender<Frame>,
    /// The next stage's workers (none after the last stage).
    pub pool: Pool,
}

/// The batching settings of the `k`-th stage of a route (`route`: indices into the pipeline's
/// stages). A `deadline` stage right after another `deadline` stage follows the routes that
/// stage reserves; a `deadline` stage after any other reserves the route through itself and
/// every `deadline` stage that directly follows it. A `deadline` stage without a latency
/// profile batches as `fixed`.
pub(crate) fn policy_settings(p: &Pipeline, route: &[usize], k: usize) -> PolicySettings {
    let s = &p.stages[route[k]];
    let ns = |d: &Duration| nanos(*d);
    let costs = if s.policy == PolicyKind::Deadline {
        route[k..]
            .iter()
            .map(|i| &p.stages[*i])
            .take_while(|t| t.policy == PolicyKind::Deadline)
            .map_while(|t| t.profile.as_ref())
            .map(|prof| StageCost {
                latency: prof.latency.iter().map(ns).collect(),
                transfer: prof.transfer.iter().map(ns).collect(),
                send_while_computing: prof.send_while_computing,
                receive: prof.receive.iter().map(ns).collect(),
            })
            .collect()
    } else {
        Vec::new()
    };
    PolicySettings {
        kind: s.policy,
        stage: k,
        max_batch: s.max_batch,
        max_wait: nanos(s.max_wait),
        margin: nanos(s.margin),
        costs,
        knob: None,
    }
}

/// A batcher's stage queue, waited on with the system clock.
struct QueueInbox {
    rx: flume::Receiver<Frame>,
    clock: SystemClock,
    /// Notified after each frame taken.
    room: Arc<Signal>,
}

impl Inbox<Frame> for QueueInbox {
    fn recv(&mut self, until: Option<Nanos>) -> Recv<Frame> {
        let got = match until {
            Some(t) => self
                .rx
                .recv_deadline(self.clock.instant_at(t))
                .map_err(|e| matches!(e, flume::RecvTimeoutError::Disconnected)),
            None => self.rx.recv().map_err(|_| true),
        };
        match got {
            Ok(f) => {
                self.room.notify();
                Recv::Item(f)
            }
            Err(true) => Recv::Closed,
            Err(false) => Recv::Timeout,
        }
    }

    fn try_recv(&mut self) -> Option<Frame> {
        let f = self.rx.try_recv().ok();
        if f.is_some() {
            self.room.notify();
        }
        f
    }

    fn sleep_until(&mut self, t: Nanos) {
        std::thread::sleep(
            self.clock
                .instant_at(t)
                .saturating_duration_since(std::time::Instant::now()),
        );
    }
}

/// A batcher's workers and counters.
struct PoolOutbox {
    stage: usize,
    pool: Pool,
    feedback: flume::Receiver<bool>,
    stats: Arc<Stats>,
    /// Where a frame dropped here lets go of an activation another node holds for it.
    release: Option<Releaser>,
}

impl Load for PoolOutbox {
    fn workers(&self) -> usize {
        self.pool.in_flight.len()
    }
    fn of(&self, worker: usize) -> usize {
        if self.pool.down[worker].load(Ordering::Relaxed) {
            // Picked only when every worker is down.
            return usize::MAX / 2;
        }
        self.pool.in_flight[worker].load(Ordering::SeqCst)
    }
}

impl Outbox<Frame> for PoolOutbox {
    fn feedback(&mut self, report: &mut dyn FnMut(bool)) {
        for on_time in self.feedback.try_iter() {
            report(on_time);
        }
    }

    fn late(&mut self, mut f: Frame) {
        if let Some(r) = &self.release {
            r.release(&mut f);
        }
        self.stats.frame_late_in_stage(self.stage, f.stream);
    }

    fn send(&mut self, a: Assigned<Frame>) {
        let batch = Batch {
            frames: a.items,
            route: a.route,
            seq: 0,
        };
        if let Err(lost) = self.pool.send_to(a.worker, batch) {
            // Workers are gone (they only stop when this batcher is): count, never lose silently.
            for f in lost.frames {
                self.stats.frame_failed_in_stage(self.stage, f.stream);
            }
        }
    }
}

/// Starts the batcher thread of stage `stage`.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_batcher(
    stage: usize,
    name: &str,
    rx: flume::Receiver<Frame>,
    pool: Pool,
    feedback: flume::Receiver<bool>,
    settings: PolicySettings,
    timeline: Arc<Mutex<Timeline>>,
    stats: Arc<Stats>,
    release: Option<Releaser>,
    clock: SystemClock,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("batch-{name}"))
        .spawn(move || {
            let mut driver = Driver::new(make_policy(settings, timeline));
            let mut inbox = QueueInbox {
                rx,
                clock,
                room: pool.room.clone(),
            };
            let mut outbox = PoolOutbox {
                stage,
                pool,
                feedback,
                stats,
                release,
            };
            let clock: &dyn Clock = &clock;
            thread::run(&mut driver, clock, &mut inbox, &mut outbox);
        })
}

#[cfg(test)]
mod tests {
    use super::Sequencer;

    #[test]
    fn the_sequencer_releases_in_dispatch_order() {
        let mut s = Sequencer::default();
        assert!(s.finish(1, "b").is_empty(), "0 is still running");
        assert!(s.finish(3, "d").is_empty());
        assert_eq!(s.finish(0, "a"), vec!["a", "b"]);
        assert_eq!(s.finish(2, "c"), vec!["c", "d"]);
        assert_eq!(s.finish(4, "e"), vec!["e"]);
    }
}
