//! Test support: the batcher thread's loop ([`super::thread::run`]) driven by scripted arrivals
//! on a [`ManualClock`], with workers that take a known latency per batch size, so the
//! runtime's batcher can be run deterministically and compared with the simulator.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::deadline::Timeline;
use super::thread::{Inbox, Outbox, Recv};
use super::{Assigned, Deadline, Hop, Load};
use crate::clock::{Clock, ManualClock, Nanos};

/// A millisecond, in nanoseconds.
pub const MS: Nanos = 1_000_000;

/// A test item: an id and a deadline.
#[derive(Debug, PartialEq)]
pub struct Item(pub u32, pub Nanos);

impl Deadline for Item {
    fn deadline(&self) -> Nanos {
        self.1
    }
}

/// Arrivals at given clock times.
pub struct ScriptInbox<T> {
    /// Items with their arrival times, in time order.
    pub arrivals: VecDeque<(Nanos, T)>,
    /// The clock it moves.
    pub clock: Arc<ManualClock>,
}

impl<T> Inbox<T> for ScriptInbox<T> {
    fn recv(&mut self, until: Option<Nanos>) -> Recv<T> {
        match (self.arrivals.front().map(|a| a.0), until) {
            (Some(a), Some(u)) if u < a => {
                self.clock.set(u);
                Recv::Timeout
            }
            (Some(a), _) => {
                self.clock.set(a);
                Recv::Item(self.arrivals.pop_front().expect("an arrival").1)
            }
            (None, Some(u)) => {
                self.clock.set(u);
                Recv::Timeout
            }
            (None, None) => Recv::Closed,
        }
    }

    fn try_recv(&mut self) -> Option<T> {
        let now = self.clock.now();
        if self.arrivals.front().is_some_and(|a| a.0 <= now) {
            self.arrivals.pop_front().map(|a| a.1)
        } else {
            None
        }
    }

    fn sleep_until(&mut self, t: Nanos) {
        self.clock.set(t);
    }
}

/// One batch sent, as recorded.
#[derive(Debug)]
pub struct Sent<T> {
    /// When.
    pub at: Nanos,
    /// To which worker.
    pub worker: usize,
    /// The items.
    pub items: Vec<T>,
    /// The reserved route.
    pub route: Option<Vec<Hop>>,
}

/// Workers of stage 0 that run each batch for `latency[size - 1]`, one at a time in the order
/// sent, and report to the timeline and the policy when they finish; every decision is recorded.
pub struct ScriptOutbox<T> {
    /// The clock the inbox moves.
    pub clock: Arc<ManualClock>,
    /// Run time per batch size.
    pub latency: Vec<Nanos>,
    /// Reservations, shared with a deadline policy.
    pub timeline: Arc<Mutex<Timeline>>,
    /// Per worker: (finish time, earliest deadline) of each batch not yet reported finished.
    pub running: Vec<VecDeque<(Nanos, Nanos)>>,
    /// Every batch sent.
    pub sent: Vec<Sent<T>>,
    /// Every item dropped late.
    pub late: Vec<T>,
}

impl<T> ScriptOutbox<T> {
    /// `workers` idle workers.
    pub fn new(
        clock: Arc<ManualClock>,
        latency: Vec<Nanos>,
        workers: usize,
        timeline: Arc<Mutex<Timeline>>,
    ) -> Self {
        Self {
            clock,
            latency,
            timeline,
            running: (0..workers).map(|_| VecDeque::new()).collect(),
            sent: Vec::new(),
            late: Vec::new(),
        }
    }
}

impl<T> Load for ScriptOutbox<T> {
    fn workers(&self) -> usize {
        self.running.len()
    }
    fn of(&self, worker: usize) -> usize {
        let now = self.clock.now();
        self.running[worker]
            .iter()
            .filter(|(end, _)| *end > now)
            .count()
    }
}

impl<T: Deadline> Outbox<T> for ScriptOutbox<T> {
    fn feedback(&mut self, report: &mut dyn FnMut(bool)) {
        let now = self.clock.now();
        for (w, q) in self.running.iter_mut().enumerate() {
            while let Some(&(end, earliest)) = q.front().filter(|(end, _)| *end <= now) {
                q.pop_front();
                self.timeline
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .finished(0, w, end, end);
                report(end <= earliest);
            }
        }
    }

    fn late(&mut self, item: T) {
        self.late.push(item);
    }

    fn send(&mut self, a: Assigned<T>) {
        let now = self.clock.now();
        let q = &mut self.running[a.worker];
        let start = q.back().map_or(now, |(end, _)| (*end).max(now));
        let run = self.latency[a.items.len().min(self.latency.len()) - 1];
        let earliest = a
            .items
            .iter()
            .map(|i| i.deadline())
            .min()
            .unwrap_or(Nanos::MAX);
        q.push_back((start + run, earliest));
        self.sent.push(Sent {
            at: now,
            worker: a.worker,
            items: a.items,
            route: a.route,
        });
    }
}
