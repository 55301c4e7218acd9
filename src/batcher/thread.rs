//! The loop of a stage's batcher thread: [`Driver`] steps wired to an inbox (the stage's queue
//! and a way to wait) and an outbox (the stage's workers and counters).
//!
//! The runtime implements both over flume channels and the system clock
//! (`crate::pipeline::graph`); tests implement them over a script on a
//! [`crate::clock::ManualClock`], which makes the thread's decisions reproducible and comparable
//! with the simulator's.

use super::{Assigned, Driver, Load};
use crate::clock::{Clock, Nanos};

/// What waiting for the next item gave.
#[derive(Debug)]
pub enum Recv<T> {
    /// An item arrived.
    Item(T),
    /// The time waited for came first.
    Timeout,
    /// No item will ever come again.
    Closed,
}

/// Where a batcher's items come from, and how it waits.
pub trait Inbox<T> {
    /// Waits for an item until clock time `until` (forever with `None`).
    fn recv(&mut self, until: Option<Nanos>) -> Recv<T>;
    /// An item that is already waiting, if any.
    fn try_recv(&mut self) -> Option<T>;
    /// Waits until clock time `t` without taking items (the batch is full but not due).
    fn sleep_until(&mut self, t: Nanos);
}

/// Where a batcher's decisions go: the stage's workers (whose load it reports) and counters.
pub trait Outbox<T>: Load {
    /// On-time reports of batches that finished since the last call, in any order.
    fn feedback(&mut self, report: &mut dyn FnMut(bool));
    /// An item dropped because it can no longer meet its deadline.
    fn late(&mut self, item: T);
    /// Sends a batch to its worker (blocking while the worker's channel is full). A batch that
    /// cannot be sent (the workers are gone) is counted as failed by the outbox.
    fn send(&mut self, batch: Assigned<T>);
}

/// Runs a batcher until its inbox closes and everything queued has been dispatched.
pub fn run<T>(
    driver: &mut Driver<T>,
    clock: &dyn Clock,
    inbox: &mut impl Inbox<T>,
    outbox: &mut impl Outbox<T>,
) {
    let mut closing = false;
    loop {
        outbox.feedback(&mut |on_time| driver.feedback(on_time));
        let now = clock.now();
        let step = driver.step(now, closing, &*outbox);
        for item in step.late {
            outbox.late(item);
        }
        if let Some(batch) = step.dispatch {
            outbox.send(batch);
            continue;
        }
        if closing && driver.is_empty() {
            return; // nothing queued and nothing more will come
        }
        // Room for more: wait for an item, or until the policy wants to look again.
        if driver.room() > 0 && !closing {
            match inbox.recv(driver.next_wakeup()) {
                Recv::Item(item) => {
                    let now = clock.now();
                    driver.push(item, now);
                    // Take whatever else is already waiting, up to a batch.
                    while driver.room() > 0 {
                        match inbox.try_recv() {
                            Some(item) => driver.push(item, now),
                            None => break,
                        }
                    }
                }
                Recv::Closed => closing = true,
                Recv::Timeout => {}
            }
        } else if let Some(t) = driver.next_wakeup() {
            inbox.sleep_until(t);
        }
    }
}
