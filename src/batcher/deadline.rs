//! Reservation-based adaptive batching under per-frame deadlines.
//!
//! The stage that runs this policy (the *head* of a route) decides for every following stage on
//! the route too. For a candidate batch of `b` frames it plans the route: on each stage the
//! worker that is free earliest, from `max(arrival of the batch, worker free)` for the stage's
//! profiled latency at batch `b` plus the transfer of the cut to the next stage (the worker is
//! busy while it sends). The batch can go when the planned finish plus a safety margin is no
//! later than the earliest deadline in it.
//!
//! - It tries batch sizes from the planned size downwards and takes the largest that fits.
//! - A full batch goes at once. A smaller one waits for more frames until the last moment at
//!   which it still fits (minus the margin, which also absorbs the batcher's wake-up delay); if a
//!   larger batch no longer fits, what fits goes at once.
//! - If not even the oldest frame alone fits, it is dropped at once (late), never run late.
//! - Frames of several streams share what is served fairly. Where a batch leaves frames behind
//!   that no later batch could serve in time, the frames it takes among those are those of the
//!   streams it served least (each frame counted 1/`priority` of its stream); otherwise it takes
//!   the oldest. A batch whose route cannot start before its first worker is free commits to
//!   its frames only at the last moment that costs nothing (when it must leave to start then),
//!   so that frames of every stream that arrived by then are in the choice, and it holds a
//!   frame of every stream besides two batches. Without this, under overload, whichever
//!   camera's frames arrived first in each frame interval took nearly every slot. A single
//!   stream is batched as before.
//! - Before a batch goes, its route is booked in the shared [`Timeline`]; later stages run it on
//!   the reserved workers. Bookings only ever start after a worker's last booking, so
//!   reservations on one worker never overlap.
//! - A stage that sends while it computes ([`StageCost::send_while_computing`]) holds its worker
//!   only until it hands the batch to its link: when computing ends, or later if the worker's
//!   previous batch is still being sent (one batch in flight on the link per worker). The next
//!   hop starts when the transfer ends.
//! - A stage whose workers receive their batches over their own link (workers on other nodes:
//!   [`StageCost::receive`]) receives batch k+1 while it computes batch k: the batch first holds
//!   the worker's link for its transfer, then the worker for its latency, from when both the
//!   batch has arrived and the worker is free. The worker taken is the one that would start it
//!   first (on ties, the one idle the longest, so that idle nodes take turns).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::{BatchPolicy, Deadline, Dispatch, Hop};
use crate::clock::Nanos;

/// Cost of one stage of a route, from its profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageCost {
    /// Latency at batch `b`, at index `b - 1`.
    pub latency: Vec<Nanos>,
    /// Time to send a batch of `b` to the next stage, at index `b - 1`.
    pub transfer: Vec<Nanos>,
    /// The worker sends batch k while it computes batch k+1, instead of holding the batch
    /// until it is sent.
    pub send_while_computing: bool,
    /// Time for a batch of `b` to reach a worker of this stage over the worker's own link, at
    /// index `b - 1`, while the worker computes its previous batch; empty where the batch is
    /// handed over in place (the transfer, if any, is the previous stage's).
    pub receive: Vec<Nanos>,
}

/// Until when each worker of each stage is reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    /// `busy_until[stage][worker]`.
    busy_until: Vec<Vec<Nanos>>,
    /// `sending_until[stage][worker]`: when the worker's last booked transfer ends (workers that
    /// send while computing have one batch in flight on their link at a time).
    sending_until: Vec<Vec<Nanos>>,
    /// `receiving_until[stage][worker]`: when the last booked transfer into the worker over its
    /// own link ends (stages that receive while computing).
    receiving_until: Vec<Vec<Nanos>>,
    /// `booked[stage][worker]`: the (start, end, sent) of the bookings not yet finished, in order.
    booked: Vec<Vec<VecDeque<(Nanos, Nanos, Nanos)>>>,
    /// `down[stage][worker]`: the worker is unavailable (its node is down) and takes no bookings.
    down: Vec<Vec<bool>>,
}

/// When a stage whose every worker is down is free: never, as far as any deadline can tell
/// (far enough from `Nanos::MAX` that adding latencies cannot overflow).
pub const UNAVAILABLE: Nanos = Nanos::MAX / 4;

impl Timeline {
    /// All workers free from time 0.
    pub fn new(workers_per_stage: &[usize]) -> Self {
        Self {
            busy_until: workers_per_stage
                .iter()
                .map(|w| vec![0; (*w).max(1)])
                .collect(),
            sending_until: workers_per_stage
                .iter()
                .map(|w| vec![0; (*w).max(1)])
                .collect(),
            receiving_until: workers_per_stage
                .iter()
                .map(|w| vec![0; (*w).max(1)])
                .collect(),
            booked: workers_per_stage
                .iter()
                .map(|w| vec![VecDeque::new(); (*w).max(1)])
                .collect(),
            down: workers_per_stage
                .iter()
                .map(|w| vec![false; (*w).max(1)])
                .collect(),
        }
    }

    /// Makes a worker unavailable (its node went down: it takes no more bookings) or available
    /// again.
    pub fn set_available(&mut self, stage: usize, worker: usize, up: bool) {
        if let Some(d) = self.down.get_mut(stage).and_then(|s| s.get_mut(worker)) {
            *d = !up;
        }
    }

    /// When a worker's last reservation ends.
    pub fn busy_until(&self, stage: usize, worker: usize) -> Nanos {
        self.busy_until[stage][worker]
    }

    /// When a worker's last booked transfer ends.
    pub fn sending_until(&self, stage: usize, worker: usize) -> Nanos {
        self.sending_until[stage][worker]
    }

    /// When a worker's last booked transfer into it ends.
    pub fn receiving_until(&self, stage: usize, worker: usize) -> Nanos {
        self.receiving_until[stage][worker]
    }

    /// The available worker of a stage that is free first (lowest index on ties), and when;
    /// [`UNAVAILABLE`] when every worker is down.
    pub fn earliest(&self, stage: usize) -> (usize, Nanos) {
        let ws = &self.busy_until[stage];
        let down = &self.down[stage];
        ws.iter()
            .enumerate()
            .filter(|(i, _)| !down[*i])
            .min_by_key(|(i, t)| (**t, *i))
            .map_or((0, UNAVAILABLE), |(w, t)| (w, *t))
    }

    /// For a batch ready at `ready` that takes `receive` to reach a worker over the worker's
    /// own link: the available worker that can start computing it first, when the batch has
    /// reached it, and when it starts; [`UNAVAILABLE`] for both when every worker is down. On
    /// ties, the worker idle the longest (then the lowest index): idle workers behind links (on
    /// other nodes) take turns, so that each stays known to work.
    pub fn earliest_receiving(
        &self,
        stage: usize,
        ready: Nanos,
        receive: Nanos,
    ) -> (usize, Nanos, Nanos) {
        let down = &self.down[stage];
        (0..self.busy_until[stage].len())
            .filter(|w| !down[*w])
            .map(|w| {
                let arrived = ready.max(self.receiving_until[stage][w]) + receive;
                (w, arrived, arrived.max(self.busy_until[stage][w]))
            })
            .min_by_key(|(w, _, start)| (*start, self.busy_until[stage][*w], *w))
            .unwrap_or((0, UNAVAILABLE, UNAVAILABLE))
    }

    /// Books a hop. It must start at or after the worker's last reservation.
    pub fn book(&mut self, hop: &Hop) {
        let t = &mut self.busy_until[hop.stage][hop.worker];
        debug_assert!(
            hop.start >= *t,
            "overlapping reservation {hop:?} (busy until {t})"
        );
        *t = hop.end;
        let sending = &mut self.sending_until[hop.stage][hop.worker];
        *sending = (*sending).max(hop.sent);
        let receiving = &mut self.receiving_until[hop.stage][hop.worker];
        *receiving = (*receiving).max(hop.arrived);
        self.booked[hop.stage][hop.worker].push_back((hop.start, hop.end, hop.sent));
    }

    /// A worker let go of a batch at `at` (its output reaches the next stage at `sent`, the
    /// same instant unless it sends while computing). Workers run their batches in booking
    /// order, so this was its oldest booking; the bookings still ahead of it move back by what
    /// it ran late, and the worker is free when the last of them would end. A device that runs
    /// a little slower than its profile thus moves the next bookings back by what it actually
    /// lost, instead of the delay piling up unseen behind back-to-back reservations.
    pub fn finished(&mut self, stage: usize, worker: usize, at: Nanos, sent: Nanos) {
        let queue = &mut self.booked[stage][worker];
        queue.pop_front();
        let t = &mut self.busy_until[stage][worker];
        let sending = &mut self.sending_until[stage][worker];
        if queue.is_empty() {
            *t = (*t).max(at);
            *sending = (*sending).max(sent);
            return;
        }
        let (mut free, mut link) = (at, sent);
        for (start, end, done) in queue.iter() {
            let late = free.max(*start) - start;
            free = end + late;
            link = link.max(done + late);
        }
        *t = free;
        *sending = link;
    }
}

/// How a deadline policy is set up.
#[derive(Debug, Clone)]
pub struct DeadlineConfig {
    /// Index of the head stage in the pipeline.
    pub stage: usize,
    /// Costs of the head stage and every following stage it reserves, in order.
    pub costs: Vec<StageCost>,
    /// Planned (largest) batch size.
    pub planned: usize,
    /// Safety margin added to every planned finish, and lead time of wake-ups.
    pub margin: Nanos,
}

/// The policy (see the module documentation).
#[derive(Debug)]
pub struct DeadlinePolicy<T> {
    /// Settings, with `planned` clamped to what every stage's profile covers.
    cfg: DeadlineConfig,
    /// Reservations shared with the pipeline's workers.
    timeline: Arc<Mutex<Timeline>>,
    /// Queued items with their arrival times, in arrival order.
    queue: VecDeque<(T, Nanos)>,
    /// Items found unable to meet their deadline, waiting for `take_late`.
    late: Vec<T>,
    /// When a waiting batch must go at the latest.
    wakeup: Option<Nanos>,
    /// Frames served per stream, each counted 1/weight (see [`FAIR_SPAN`]).
    served: BTreeMap<usize, f64>,
    /// When each stream's last frame arrived.
    arrivals: BTreeMap<usize, Nanos>,
}

/// How long after its last frame a stream still counts among those that compete.
const STREAM_ACTIVE: Nanos = 1_000_000_000;

/// How far (in weighted frames) a stream's count of frames served may lag the most served
/// stream's: a stream that comes back after a pause, or a new one, gets at most this many
/// frames ahead of the others before they take turns again.
pub const FAIR_SPAN: f64 = 4.0;

impl<T: Deadline> DeadlinePolicy<T> {
    /// A policy over the shared timeline.
    pub fn new(mut cfg: DeadlineConfig, timeline: Arc<Mutex<Timeline>>) -> Self {
        let covered = cfg
            .costs
            .iter()
            .map(|c| {
                let n = c.latency.len().min(c.transfer.len());
                if c.receive.is_empty() {
                    n
                } else {
                    n.min(c.receive.len())
                }
            })
            .min()
            .unwrap_or(1);
        cfg.planned = cfg.planned.clamp(1, covered.max(1));
        Self {
            cfg,
            timeline,
            queue: VecDeque::new(),
            late: Vec::new(),
            wakeup: None,
            served: BTreeMap::new(),
            arrivals: BTreeMap::new(),
        }
    }

    /// Streams that sent a frame within [`STREAM_ACTIVE`] of the last frame.
    fn active_streams(&self) -> usize {
        let last = self.arrivals.values().copied().max().unwrap_or(0);
        self.arrivals
            .values()
            .filter(|&&t| t + STREAM_ACTIVE >= last)
            .count()
    }

    /// Whether the queue holds frames of more than one stream.
    fn streams_differ(&self) -> bool {
        let mut it = self.queue.iter().map(|(t, _)| t.stream());
        it.next()
            .is_some_and(|first| it.any(|stream| stream != first))
    }

    /// When a batch of `b` planned as `route` at `now` could still leave and keep that route
    /// (its first worker is busy until then), if that is worth waiting for.
    fn leave_later(&self, tl: &Timeline, now: Nanos, b: usize, route: &[Hop]) -> Option<Nanos> {
        let first = route.first()?;
        let leave = first
            .start
            .saturating_sub(first.arrived.saturating_sub(now));
        let wake = leave.saturating_sub(self.cfg.margin);
        if wake <= now.saturating_add(self.cfg.margin) {
            return None;
        }
        let finish = |r: &[Hop]| r.last().map(|h| h.sent);
        (finish(&self.plan(tl, wake, b)) == finish(route)).then_some(wake)
    }

    /// Takes the `b` frames of the batch planned as `route` from the queue: the first `b`,
    /// unless frames of several streams that only this batch can still serve (their deadline
    /// falls before the earliest finish of a batch after it) outnumber, or lie beyond, them.
    /// Then those frames go first, the least served streams' first, and what room is left goes
    /// to the oldest frames that fit.
    fn take_batch(&mut self, tl: &Timeline, now: Nanos, b: usize, route: &[Hop]) -> Vec<T> {
        let taken: Vec<T> = if b >= self.queue.len() || !self.streams_differ() {
            self.queue.drain(..b).map(|(t, _)| t).collect()
        } else {
            let finish = route.last().map_or(now, |h| h.sent) + self.cfg.margin;
            let mut after = tl.clone();
            route.iter().for_each(|hop| after.book(hop));
            let next = self.plan(&after, now, 1).last().map_or(now, |h| h.sent) + self.cfg.margin;
            let fits = |d: Nanos| d >= finish;
            let urgent: Vec<usize> = (0..self.queue.len())
                .filter(|&i| {
                    let d = self.queue[i].0.deadline();
                    fits(d) && d < next
                })
                .collect();
            if urgent.iter().all(|&i| i < b) {
                self.queue.drain(..b).map(|(t, _)| t).collect()
            } else {
                let mut order = urgent;
                order.sort_by(|&i, &j| {
                    let (x, y) = (&self.queue[i].0, &self.queue[j].0);
                    self.served_of(x.stream())
                        .total_cmp(&self.served_of(y.stream()))
                        .then(x.deadline().cmp(&y.deadline()))
                        .then(i.cmp(&j))
                });
                let mut chosen: Vec<usize> = order.into_iter().take(b).collect();
                for i in 0..self.queue.len() {
                    if chosen.len() == b {
                        break;
                    }
                    if !chosen.contains(&i) && fits(self.queue[i].0.deadline()) {
                        chosen.push(i);
                    }
                }
                chosen.sort_unstable();
                let mut kept = VecDeque::with_capacity(self.queue.len() - chosen.len());
                let mut out = Vec::with_capacity(chosen.len());
                for (i, item) in std::mem::take(&mut self.queue).into_iter().enumerate() {
                    if chosen.binary_search(&i).is_ok() {
                        out.push(item.0);
                    } else {
                        kept.push_back(item);
                    }
                }
                self.queue = kept;
                out
            }
        };
        for t in &taken {
            let n = self.served_of(t.stream()) + 1.0 / f64::from(t.weight().max(1));
            self.served.insert(t.stream(), n);
        }
        taken
    }

    /// Frames served to `stream`, weighted, at most [`FAIR_SPAN`] behind the most served.
    fn served_of(&self, stream: usize) -> f64 {
        let top = self.served.values().copied().fold(0.0, f64::max);
        self.served
            .get(&stream)
            .copied()
            .unwrap_or(0.0)
            .max(top - FAIR_SPAN)
    }

    /// The route a batch of `b` would take if it left at `now`. A hop holds its worker for the
    /// stage's latency plus the transfer of the cut to the next stage (sending is part of the
    /// stage's work), or, where the stage sends while computing, until it can hand the batch to
    /// its link (its previous transfer done). The next hop starts when the transfer ends; where
    /// the next stage's workers receive over their own links, when the batch has reached one.
    pub fn plan(&self, tl: &Timeline, now: Nanos, b: usize) -> Vec<Hop> {
        let mut t = now;
        let last = self.cfg.costs.len() - 1;
        let mut hops = Vec::with_capacity(self.cfg.costs.len());
        for (k, cost) in self.cfg.costs.iter().enumerate() {
            let stage = self.cfg.stage + k;
            let receive = cost.receive.get(b - 1).copied().unwrap_or(0);
            let (worker, arrived, start) = if receive > 0 {
                tl.earliest_receiving(stage, t, receive)
            } else {
                let (worker, free) = tl.earliest(stage);
                (worker, t, t.max(free))
            };
            let computed = start + cost.latency[b - 1];
            let transfer = if k < last { cost.transfer[b - 1] } else { 0 };
            let (end, sent) = if cost.send_while_computing && transfer > 0 {
                let handoff = computed.max(tl.sending_until(stage, worker));
                (handoff, handoff + transfer)
            } else {
                (computed + transfer, computed + transfer)
            };
            hops.push(Hop {
                stage,
                worker,
                arrived,
                start,
                end,
                sent,
            });
            t = sent;
        }
        hops
    }

    /// Earliest deadline among the first `b` queued items.
    fn min_deadline(&self, b: usize) -> Nanos {
        self.queue
            .iter()
            .take(b)
            .map(|(t, _)| t.deadline())
            .min()
            .unwrap_or(Nanos::MAX)
    }

    /// The largest batch of the queue's head that fits, with its route and slack.
    fn largest_fit(&self, tl: &Timeline, now: Nanos) -> Option<(usize, Vec<Hop>, Nanos)> {
        let n = self.queue.len().min(self.cfg.planned);
        (1..=n).rev().find_map(|b| {
            let route = self.plan(tl, now, b);
            let finish = route.last().map_or(now, |h| h.sent) + self.cfg.margin;
            let deadline = self.min_deadline(b);
            (finish <= deadline).then(|| (b, route, deadline - finish))
        })
    }
}

impl<T: Deadline + Send> BatchPolicy<T> for DeadlinePolicy<T> {
    fn finds_late_when_batching(&self) -> bool {
        true
    }

    fn push(&mut self, item: T, now: Nanos) {
        self.arrivals.insert(item.stream(), now);
        self.queue.push_back((item, now));
    }

    fn take_late(&mut self, now: Nanos) -> Vec<T> {
        {
            let tl = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
            while let Some((front, _)) = self.queue.front() {
                let route = self.plan(&tl, now, 1);
                let finish = route.last().map_or(now, |h| h.sent) + self.cfg.margin;
                if finish <= front.deadline() {
                    break;
                }
                let (t, _) = self.queue.pop_front().expect("front exists");
                self.late.push(t);
            }
        }
        std::mem::take(&mut self.late)
    }

    fn next_batch(&mut self, now: Nanos, closing: bool) -> Option<Dispatch<T>> {
        self.wakeup = None;
        let timeline = self.timeline.clone();
        let mut tl = timeline.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.queue.is_empty() {
                return None;
            }
            let Some((b, route, slack)) = self.largest_fit(&tl, now) else {
                // Not even the oldest frame alone can make it: drop it now, never run it late.
                let (t, _) = self.queue.pop_front().expect("not empty");
                self.late.push(t);
                continue;
            };
            let full = b == self.cfg.planned;
            let larger_no_longer_fits = b < self.queue.len();
            let last_moment = now + slack - self.cfg.margin;
            let must = closing || slack <= self.cfg.margin;
            if must || full || larger_no_longer_fits {
                // Streams compete: choose which frames go when the batch must leave.
                let later = (!must && self.active_streams() > 1)
                    .then(|| self.leave_later(&tl, now, b, &route))
                    .flatten();
                if let Some(wake) = later {
                    self.wakeup = Some(wake.min(last_moment));
                    return None;
                }
                let items = self.take_batch(&tl, now, b, &route);
                for hop in &route {
                    tl.book(hop);
                }
                return Some(Dispatch {
                    items,
                    route: Some(route),
                });
            }
            // Wait for more frames, until the last moment this batch still fits.
            self.wakeup = Some(last_moment);
            return None;
        }
    }

    fn next_wakeup(&self) -> Option<Nanos> {
        if !self.late.is_empty() {
            return Some(0);
        }
        self.wakeup
    }

    fn len(&self) -> usize {
        self.queue.len() + self.late.len()
    }

    fn max_batch(&self) -> usize {
        self.cfg.planned
    }

    fn holds(&self) -> usize {
        // Where frames of several streams compete: the batch, the next one, and a frame of
        // every other stream that sent one lately, which is what is chosen from.
        match self.active_streams() {
            0 | 1 => self.cfg.planned,
            n => 2 * self.cfg.planned + n - 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::script::{ScriptInbox, ScriptOutbox, Sent};
    use crate::batcher::{BatchPolicy, Driver};
    use crate::clock::ManualClock;
    use proptest::prelude::*;

    const MS: Nanos = 1_000_000;

    #[test]
    fn a_worker_that_is_down_takes_no_bookings_until_it_is_back() {
        let mut tl = Timeline::new(&[1, 2]);
        tl.book(&Hop {
            stage: 1,
            worker: 0,
            arrived: 0,
            start: 0,
            end: 10 * MS,
            sent: 10 * MS,
        });
        // Worker 1 is free first.
        assert_eq!(tl.earliest(1), (1, 0));
        tl.set_available(1, 1, false);
        assert_eq!(tl.earliest(1), (0, 10 * MS));
        tl.set_available(1, 0, false);
        assert_eq!(tl.earliest(1), (0, UNAVAILABLE));
        // Stage 0 is untouched.
        assert_eq!(tl.earliest(0), (0, 0));
        tl.set_available(1, 1, true);
        assert_eq!(tl.earliest(1), (1, 0));
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Item {
        id: usize,
        deadline: Nanos,
    }
    impl Deadline for Item {
        fn deadline(&self) -> Nanos {
            self.deadline
        }
    }

    /// Latency `base + per * b` ms, transfer `tr * b` ms.
    fn cost(base: u64, per: u64, tr: u64) -> StageCost {
        StageCost {
            latency: (1..=8).map(|b| (base + per * b) * MS).collect(),
            transfer: (1..=8).map(|b| tr * b * MS).collect(),
            send_while_computing: false,
            receive: Vec::new(),
        }
    }

    fn policy(
        costs: Vec<StageCost>,
        workers: &[usize],
        planned: usize,
        margin: Nanos,
    ) -> (DeadlinePolicy<Item>, Arc<Mutex<Timeline>>) {
        let tl = Arc::new(Mutex::new(Timeline::new(workers)));
        let p = DeadlinePolicy::new(
            DeadlineConfig {
                stage: 0,
                costs,
                planned,
                margin,
            },
            tl.clone(),
        );
        (p, tl)
    }

    #[test]
    fn waits_until_the_last_moment_then_sends_what_is_queued_with_its_route() {
        // Stage 0: 2 + 1*b ms; transfer 1*b ms; stage 1: 3 + 2*b ms.
        let (mut p, tl) = policy(vec![cost(2, 1, 1), cost(3, 2, 0)], &[1, 1], 4, 0);
        p.push(
            Item {
                id: 0,
                deadline: 30 * MS,
            },
            0,
        );
        p.push(
            Item {
                id: 1,
                deadline: 31 * MS,
            },
            0,
        );
        // b = 2 at t: 2+2 = 4 ms, +2 ms transfer, +3+4 = 7 ms -> 13 ms; deadline 30 -> slack 17.
        assert!(p.next_batch(0, false).is_none());
        assert_eq!(p.next_wakeup(), Some(17 * MS));
        // At 17 ms the batch goes, with its route booked: stage 0 holds its worker while it sends.
        let d = p.next_batch(17 * MS, false).expect("the last moment");
        assert_eq!(d.items.iter().map(|i| i.id).collect::<Vec<_>>(), vec![0, 1]);
        let route = d.route.unwrap();
        assert_eq!(
            route,
            vec![
                Hop {
                    stage: 0,
                    worker: 0,
                    arrived: 17 * MS,
                    start: 17 * MS,
                    end: 23 * MS,
                    sent: 23 * MS,
                },
                Hop {
                    stage: 1,
                    worker: 0,
                    arrived: 23 * MS,
                    start: 23 * MS,
                    end: 30 * MS,
                    sent: 30 * MS,
                },
            ]
        );
        assert_eq!(tl.lock().unwrap().busy_until(1, 0), 30 * MS);
    }

    #[test]
    fn a_full_batch_goes_at_once_and_the_largest_fitting_size_is_taken() {
        let (mut p, _) = policy(vec![cost(0, 10, 0)], &[1], 3, 0);
        for id in 0..3 {
            p.push(
                Item {
                    id,
                    deadline: 100 * MS,
                },
                0,
            );
        }
        assert_eq!(p.next_batch(0, false).unwrap().items.len(), 3, "full");
        // The worker is now busy until 30 ms. Three more with deadline 65 ms:
        // b=3 ends 60 fits; so does... b=3 is full -> goes at once.
        for id in 3..6 {
            p.push(
                Item {
                    id,
                    deadline: 55 * MS,
                },
                0,
            );
        }
        // b=3 would end at 60 > 55; b=2 ends at 50 <= 55: two go now, one stays.
        let d = p.next_batch(0, false).unwrap();
        assert_eq!(d.items.iter().map(|i| i.id).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(
            d.route.unwrap()[0],
            Hop {
                stage: 0,
                worker: 0,
                arrived: 0,
                start: 30 * MS,
                end: 50 * MS,
                sent: 50 * MS,
            }
        );
        // The last one would start at 50 and end at 60 > 55: dropped, not run late.
        assert!(p.next_batch(0, false).is_none());
        assert_eq!(
            p.take_late(0).iter().map(|i| i.id).collect::<Vec<_>>(),
            vec![5]
        );
    }

    #[test]
    fn picks_the_worker_that_is_free_first_on_every_stage() {
        let (mut p, tl) = policy(vec![cost(5, 0, 0), cost(5, 0, 0)], &[1, 2], 1, 0);
        tl.lock().unwrap().book(&Hop {
            stage: 1,
            worker: 0,
            arrived: 0,
            start: 0,
            end: 40 * MS,
            sent: 40 * MS,
        });
        p.push(
            Item {
                id: 0,
                deadline: 100 * MS,
            },
            0,
        );
        let route = p.next_batch(0, false).unwrap().route.unwrap();
        assert_eq!(
            route[1],
            Hop {
                stage: 1,
                worker: 1,
                arrived: 5 * MS,
                start: 5 * MS,
                end: 10 * MS,
                sent: 10 * MS,
            }
        );
    }

    #[test]
    fn a_stage_that_sends_while_computing_frees_its_worker_at_hand_off() {
        // Stage 0: 10 ms to compute, 15 ms to send; stage 1: 5 ms. One worker each.
        let costs = |overlap| {
            vec![
                StageCost {
                    send_while_computing: overlap,
                    ..cost(9, 1, 15)
                },
                cost(4, 1, 0),
            ]
        };
        let hops = |h: &[Hop]| -> Vec<(Nanos, Nanos, Nanos)> {
            h.iter()
                .map(|h| (h.start / MS, h.end / MS, h.sent / MS))
                .collect()
        };
        let two_batches = |overlap| {
            let (p, tl) = policy(costs(overlap), &[1, 1], 1, 0);
            let mut tl = tl.lock().unwrap();
            let a = p.plan(&tl, 0, 1);
            a.iter().for_each(|h| tl.book(h));
            let b = p.plan(&tl, 0, 1);
            b.iter().for_each(|h| tl.book(h));
            (hops(&a), hops(&b))
        };
        // Held for compute + send: the second batch starts at 25.
        assert_eq!(
            two_batches(false),
            (
                vec![(0, 25, 25), (25, 30, 30)],
                vec![(25, 50, 50), (50, 55, 55)]
            )
        );
        // Sending while computing: the second batch computes from 10 to 20, then waits for the
        // first transfer (until 25) to hand off, and arrives at 40.
        assert_eq!(
            two_batches(true),
            (
                vec![(0, 10, 25), (25, 30, 30)],
                vec![(10, 25, 40), (40, 45, 45)]
            )
        );
        // The first batch lets go 3 ms late (its transfer ends at 28): the second moves back.
        let (p, tl) = policy(costs(true), &[1, 1], 1, 0);
        let mut tl = tl.lock().unwrap();
        for _ in 0..2 {
            let r = p.plan(&tl, 0, 1);
            r.iter().for_each(|h| tl.book(h));
        }
        tl.finished(0, 0, 13 * MS, 28 * MS);
        assert_eq!(tl.busy_until(0, 0), 28 * MS);
        assert_eq!(tl.sending_until(0, 0), 43 * MS);
    }

    /// 15 ms per frame to reach a worker over its link, 20 ms (+1 per frame) to compute.
    fn behind_link() -> StageCost {
        StageCost {
            receive: (1..=8).map(|b| 15 * b as Nanos * MS).collect(),
            ..cost(19, 1, 0)
        }
    }

    /// Books worker `w` of stage 1: the batch arrived at `arrived`, and runs until `end`.
    fn booked(tl: &mut Timeline, w: usize, arrived: Nanos, end: Nanos) {
        tl.book(&Hop {
            stage: 1,
            worker: w,
            arrived,
            start: arrived,
            end,
            sent: end,
        });
    }

    /// A 10 ms head, then two workers behind their links.
    fn two_behind_links() -> (DeadlinePolicy<Item>, Arc<Mutex<Timeline>>) {
        policy(vec![cost(9, 1, 0), behind_link()], &[1, 2], 1, 0)
    }

    #[test]
    fn a_worker_behind_its_own_link_receives_the_next_batch_while_it_computes() {
        // Stage 0: 10 ms; stage 1: 15 ms to reach its worker, 20 ms to compute.
        let receiving = behind_link();
        let hops = |h: &[Hop]| -> Vec<(Nanos, Nanos, Nanos)> {
            h.iter()
                .map(|h| (h.arrived / MS, h.start / MS, h.end / MS))
                .collect()
        };
        let (p, tl) = policy(vec![cost(9, 1, 0), receiving], &[1, 1], 1, 0);
        let mut tl = tl.lock().unwrap();
        let book = |tl: &mut Timeline| {
            let r = p.plan(tl, 0, 1);
            r.iter().for_each(|h| tl.book(h));
            hops(&r)
        };
        // The first batch arrives at 25 and runs until 45.
        assert_eq!(book(&mut tl), vec![(0, 0, 10), (25, 25, 45)]);
        // The second is on the link from 25 (after the first) to 40, while the worker computes
        // the first: it starts at 45, not 45 + 15.
        assert_eq!(book(&mut tl), vec![(0, 10, 20), (40, 45, 65)]);
        assert_eq!(tl.receiving_until(1, 0), 40 * MS);
        // A third: its transfer (40..55) also hides behind the second's compute.
        assert_eq!(book(&mut tl), vec![(0, 20, 30), (55, 65, 85)]);
        // A late finish moves the computations still ahead, not the link's bookings.
        tl.finished(1, 0, 50 * MS, 50 * MS);
        assert_eq!(tl.busy_until(1, 0), 90 * MS);
        assert_eq!(tl.receiving_until(1, 0), 55 * MS);

        // Of two workers, the one that can start first: worker 0's link is free but it computes
        // until 100; worker 1 computes nothing but its link is busy until 60.
        let (p, tl) = two_behind_links();
        let mut tl = tl.lock().unwrap();
        booked(&mut tl, 0, 0, 100 * MS);
        booked(&mut tl, 1, 60 * MS, 60 * MS);
        let r = p.plan(&tl, 0, 1);
        // Worker 1: on its link 60..75, computes 75..95; worker 0 could only start at 100.
        assert_eq!(
            (r[1].worker, r[1].arrived / MS, r[1].start / MS),
            (1, 75, 75)
        );
        tl.set_available(1, 1, false);
        let r = p.plan(&tl, 0, 1);
        assert_eq!(
            (r[1].worker, r[1].arrived / MS, r[1].start / MS),
            (0, 25, 100)
        );
        tl.set_available(1, 0, false);
        assert_eq!(p.plan(&tl, 0, 1)[1].start, UNAVAILABLE);

        // Both idle: the one idle the longest takes it, then the other.
        let (p, tl) = two_behind_links();
        let mut tl = tl.lock().unwrap();
        booked(&mut tl, 0, 0, 5 * MS);
        let r = p.plan(&tl, 100 * MS, 1);
        assert_eq!(r[1].worker, 1);
        r.iter().for_each(|h| tl.book(h));
        assert_eq!(p.plan(&tl, 200 * MS, 1)[1].worker, 0);
    }

    #[test]
    fn a_late_finish_moves_the_bookings_still_ahead() {
        let mut tl = Timeline::new(&[1]);
        let hop = |start, end| Hop {
            stage: 0,
            worker: 0,
            arrived: start,
            start,
            end,
            sent: end,
        };
        tl.book(&hop(0, 10));
        tl.book(&hop(10, 20));
        tl.book(&hop(30, 40));
        // The first batch ends 2 late: the second will end 2 late, the third still fits its slot.
        tl.finished(0, 0, 12, 12);
        assert_eq!(tl.busy_until(0, 0), 40);
        // The second ends 25 late: the third starts late too.
        tl.finished(0, 0, 45, 45);
        assert_eq!(tl.busy_until(0, 0), 55);
        tl.finished(0, 0, 55, 55);
        assert_eq!(tl.busy_until(0, 0), 55);
        // Nothing booked: a finish only ever moves the free time later.
        tl.finished(0, 0, 50, 50);
        assert_eq!(tl.busy_until(0, 0), 55);
    }

    #[test]
    fn the_margin_makes_room_for_late_wakeups() {
        let (mut p, _) = policy(vec![cost(0, 10, 0)], &[1], 4, 2 * MS);
        p.push(
            Item {
                id: 0,
                deadline: 50 * MS,
            },
            0,
        );
        // b=1: finish 10 + margin 2 -> slack 38; wake 2 ms early, at 36 ms.
        assert!(p.next_batch(0, false).is_none());
        assert_eq!(p.next_wakeup(), Some(36 * MS));
        // Woken 1 ms late, it still fits.
        let d = p.next_batch(37 * MS, false).unwrap();
        assert_eq!(d.route.unwrap()[0].end, 47 * MS);
    }

    /// Drives the policy over scripted arrivals on a controlled clock through the runtime's
    /// batcher loop ([`crate::batcher::thread::run`]): at every arrival and every wake-up, take
    /// the late and dispatch what is due.
    fn simulate(
        arrivals: &[(Nanos, Nanos)],
        costs: Vec<StageCost>,
        workers: &[usize],
        planned: usize,
    ) -> (Vec<Sent<Item>>, Vec<Item>) {
        let items = arrivals
            .iter()
            .enumerate()
            .map(|(id, (at, slo))| {
                (
                    *at,
                    Item {
                        id,
                        deadline: at + slo,
                    },
                )
            })
            .collect();
        run_script(items, costs, workers, planned)
    }

    /// [`simulate`] for any items.
    fn run_script<T: Deadline + Send + 'static>(
        arrivals: VecDeque<(Nanos, T)>,
        costs: Vec<StageCost>,
        workers: &[usize],
        planned: usize,
    ) -> (Vec<Sent<T>>, Vec<T>) {
        // The head stage's workers hold a batch for its latency, and its transfer when another
        // stage follows, as the policy books them.
        let latency: Vec<Nanos> = (0..costs[0].latency.len())
            .map(|i| {
                costs[0].latency[i]
                    + if costs.len() > 1 {
                        costs[0].transfer[i]
                    } else {
                        0
                    }
            })
            .collect();
        let tl = Arc::new(Mutex::new(Timeline::new(workers)));
        let p = DeadlinePolicy::<T>::new(
            DeadlineConfig {
                stage: 0,
                costs,
                planned,
                margin: MS,
            },
            tl.clone(),
        );
        let mut driver = Driver::new(Box::new(p) as Box<dyn BatchPolicy<T>>);
        let clock = Arc::new(ManualClock::new(0));
        let mut inbox = ScriptInbox {
            arrivals,
            clock: clock.clone(),
        };
        let mut outbox = ScriptOutbox::new(clock.clone(), latency, workers[0], tl);
        crate::batcher::thread::run(&mut driver, &*clock, &mut inbox, &mut outbox);
        (outbox.sent, outbox.late)
    }

    /// A frame of camera `stream`, whose priority is `weight`.
    #[derive(Debug, Clone, PartialEq)]
    struct Cam {
        id: usize,
        stream: usize,
        weight: u32,
        deadline: Nanos,
    }
    impl Deadline for Cam {
        fn deadline(&self) -> Nanos {
            self.deadline
        }
        fn stream(&self) -> usize {
            self.stream
        }
        fn weight(&self) -> u32 {
            self.weight
        }
    }

    /// Cameras of these priorities, each sending a frame every `period` for `n` periods, camera
    /// k's `k * skew` after camera 0's (nearly in phase, as cameras started together are);
    /// deadline `slo` after capture.
    fn cameras(
        weights: &[u32],
        period: Nanos,
        skew: Nanos,
        n: usize,
        slo: Nanos,
    ) -> VecDeque<(Nanos, Cam)> {
        let mut out = VecDeque::new();
        for i in 0..n {
            for (k, &weight) in weights.iter().enumerate() {
                let at = i as Nanos * period + k as Nanos * skew;
                let id = out.len();
                out.push_back((
                    at,
                    Cam {
                        id,
                        stream: k,
                        weight,
                        deadline: at + slo,
                    },
                ));
            }
        }
        out
    }

    /// Frames served per camera.
    fn served(sent: &[Sent<Cam>], cameras: usize) -> Vec<usize> {
        let mut n = vec![0; cameras];
        for c in sent.iter().flat_map(|d| &d.items) {
            n[c.stream] += 1;
        }
        n
    }

    #[test]
    fn overloaded_cameras_share_what_is_served_by_their_priority() {
        // One worker, 40 ms a frame (25 frames/s); three cameras at 30 frames/s, 0.2 ms apart,
        // SLO 100 ms: under a third of the frames can be served. Served oldest first, the
        // camera whose frames come first in each period took nearly every slot.
        let run = |weights: &[u32], planned: usize| {
            let arrivals = cameras(weights, 33 * MS, MS / 5, 90, 100 * MS);
            let total = arrivals.len();
            let (sent, late) = run_script(arrivals, vec![cost(39, 1, 0)], &[1], planned);
            assert_eq!(
                sent.iter().map(|d| d.items.len()).sum::<usize>() + late.len(),
                total,
                "every frame served or dropped late"
            );
            for d in &sent {
                let end = d.route.as_ref().unwrap()[0].end;
                assert!(d.items.iter().all(|c| end <= c.deadline), "{d:?}");
            }
            served(&sent, weights.len())
        };
        for planned in [1, 2] {
            let n = run(&[1, 1, 1], planned);
            let (lo, hi) = (n.iter().min().unwrap(), n.iter().max().unwrap());
            assert!(*lo >= 20, "batch {planned}: {n:?}");
            assert!(hi - lo <= 2, "batch {planned}: {n:?}");
            // Priorities 2:1:1 give camera 0 half of what is served.
            let n = run(&[2, 1, 1], planned);
            assert!(n[1].abs_diff(n[2]) <= 2, "batch {planned}: {n:?}");
            assert!(n[0].abs_diff(n[1] + n[2]) <= 3, "batch {planned}: {n:?}");
        }
    }

    proptest! {
        #[test]
        fn routes_meet_deadlines_never_overlap_and_nothing_is_lost(
            gaps in proptest::collection::vec(0u64..20, 1..120),
            slo in 20u64..200,
            base in proptest::collection::vec(0u64..10, 1..4),
            per in 1u64..10,
            workers in proptest::collection::vec(1usize..4, 3),
            planned in 1usize..8,
            receive in 0u64..4,
        ) {
            let mut t = 0;
            let arrivals: Vec<(Nanos, Nanos)> = gaps.iter().map(|g| { t += g * MS; (t, slo * MS) }).collect();
            // Later stages' workers may sit behind their own links.
            let costs: Vec<StageCost> = base.iter().enumerate().map(|(k, b)| StageCost {
                receive: if k > 0 { (1..=8).map(|b| receive * b * MS).collect() } else { Vec::new() },
                ..cost(*b, per, 1)
            }).collect();
            let w = &workers[..costs.len()];
            let (dispatched, late) = simulate(&arrivals, costs.clone(), w, planned);
            // Every frame exactly once: dispatched or late.
            let mut seen: Vec<usize> = dispatched.iter().flat_map(|d| d.items.iter().map(|i| i.id)).chain(late.iter().map(|i| i.id)).collect();
            seen.sort();
            prop_assert_eq!(seen, (0..arrivals.len()).collect::<Vec<_>>());
            let mut booked: std::collections::HashMap<(usize, usize), Vec<(Nanos, Nanos)>> = Default::default();
            for d in &dispatched {
                let route = d.route.as_ref().unwrap();
                prop_assert!(d.items.len() <= planned);
                prop_assert_eq!(route.len(), costs.len());
                // No batch holds a frame whose deadline its route cannot meet.
                let finish = route.last().unwrap().end;
                prop_assert!(d.items.iter().all(|i| finish <= i.deadline), "{:?}", d);
                // Frames stay in arrival order.
                prop_assert!(d.items.windows(2).all(|w| w[0].id < w[1].id));
                for h in route {
                    booked.entry((h.stage, h.worker)).or_default().push((h.start, h.end));
                }
            }
            for v in booked.values_mut() {
                v.sort();
                prop_assert!(v.windows(2).all(|w| w[0].1 <= w[1].0), "overlap: {:?}", v);
            }
        }

        #[test]
        fn several_cameras_lose_no_frame_and_miss_no_deadline(
            gaps in proptest::collection::vec(0u64..15, 1..150),
            cams in proptest::collection::vec((0usize..4, 1u32..4), 1..150),
            slo in 20u64..150,
            base in 0u64..20,
            per in 1u64..10,
            workers in 1usize..3,
            planned in 1usize..6,
        ) {
            let mut t = 0;
            let arrivals: VecDeque<(Nanos, Cam)> = gaps.iter().zip(cams.iter().cycle()).enumerate().map(|(id, (g, &(stream, weight)))| {
                t += g * MS;
                (t, Cam { id, stream, weight, deadline: t + slo * MS })
            }).collect();
            let n = arrivals.len();
            let (sent, late) = run_script(arrivals, vec![cost(base, per, 0)], &[workers], planned);
            let mut seen: Vec<usize> = sent.iter().flat_map(|d| d.items.iter().map(|c| c.id)).chain(late.iter().map(|c| c.id)).collect();
            seen.sort();
            prop_assert_eq!(seen, (0..n).collect::<Vec<_>>());
            let mut booked: Vec<Vec<(Nanos, Nanos)>> = vec![Vec::new(); workers];
            for d in &sent {
                prop_assert!(d.items.len() <= planned);
                let hop = d.route.as_ref().unwrap()[0];
                prop_assert!(d.items.iter().all(|c| hop.end <= c.deadline), "{:?}", d);
                booked[hop.worker].push((hop.start, hop.end));
            }
            for v in &mut booked {
                v.sort();
                prop_assert!(v.windows(2).all(|w| w[0].1 <= w[1].0), "overlap: {:?}", v);
            }
        }

        #[test]
        fn with_ample_capacity_and_steady_load_nothing_is_dropped(
            n in 1usize..200,
            gap in 5u64..20,
            planned in 1usize..8,
        ) {
            // 1 ms + 0.5 ms per frame on each of two stages, a frame every 5..20 ms, SLO 100 ms.
            let costs = vec![
                StageCost { latency: (1..=8).map(|b| MS + b as u64 * MS / 2).collect(), transfer: vec![0; 8], send_while_computing: false, receive: Vec::new() },
                StageCost { latency: (1..=8).map(|b| MS + b as u64 * MS / 2).collect(), transfer: vec![0; 8], send_while_computing: false, receive: Vec::new() },
            ];
            let arrivals: Vec<(Nanos, Nanos)> = (0..n).map(|i| (i as u64 * gap * MS, 100 * MS)).collect();
            let (dispatched, late) = simulate(&arrivals, costs, &[1, 1], planned);
            prop_assert!(late.is_empty(), "dropped {} of {}", late.len(), n);
            prop_assert_eq!(dispatched.iter().map(|d| d.items.len()).sum::<usize>(), n);
        }
    }
}
