//! The threads of a recurrent stage: each worker owns a [`Recurrent`] cell and steps it,
//! taking frames from its queue between steps (cellular batching: items join at the next step);
//! with several workers a router sends each stream's frames to one of them (`stream % workers`),
//! where that stream's state lives.
//!
//! Every frame is accounted for: passed on when complete, counted late when an item of it could
//! not end in time, failed when its step failed; at shutdown a worker steps until its frames are
//! done.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::graph::Downstream;
use super::worker::{PANIC_STAGE_ENV, injected_panic};
use crate::admission::Signal;
use crate::clock::SharedClock;
use crate::frame::Frame;
use crate::panics::panic_message;
use crate::recurrent::{Outcome, Recurrent};
use crate::stats::Stats;

/// What a recurrent worker shares with the pipeline.
pub(super) struct CellWorker {
    pub stage: usize,
    pub next_stage: Option<usize>,
    pub name: String,
    pub worker: usize,
    /// Most frames it holds (beyond them, frames wait in its queue).
    pub capacity: usize,
    pub next: Downstream,
    pub room: Arc<Signal>,
    pub stats: Arc<Stats>,
    pub clock: SharedClock,
    /// Steps the stage's pool has started, counted only when [`PANIC_STAGE_ENV`] names it.
    pub started: Arc<AtomicU64>,
}

impl CellWorker {
    fn settle(&self, out: Outcome) {
        let stats = &self.stats;
        if out.rows > 0 {
            stats.batch_ran(self.stage, out.rows, out.busy);
        }
        if let Some(e) = &out.error {
            tracing::error!(stage = %self.name, frames = out.failed.len(), error = %e, "Step failed.");
        }
        for f in out.late {
            stats.frame_late_in_stage(self.stage, f.stream);
        }
        for f in out.failed {
            stats.frame_failed_in_stage(self.stage, f.stream);
        }
        let now = self.clock.now();
        for mut f in out.done {
            let spent = now.saturating_sub(f.entered_stage);
            stats.frame_left_stage(self.stage, spent);
            f.stage_nanos.push(spent);
            f.entered_stage = now;
            let stream = f.stream;
            match self.next.queue.send(f) {
                Ok(()) => {
                    if let Some(next) = self.next_stage {
                        stats.frames_entered(next, 1);
                    }
                }
                Err(_) => stats.frame_failed_between_stages(stream),
            }
        }
    }

    fn took(&self) {
        self.room.notify();
    }
}

/// Starts a recurrent worker over its frames' channel.
pub(super) fn spawn_cell_worker(
    cx: CellWorker,
    mut cell: Recurrent,
    rx: flume::Receiver<Frame>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("{}-{}", cx.name, cx.worker))
        .spawn(move || {
            let thread = format!("stage `{}` worker {}", cx.name, cx.worker);
            let panic_at = injected_panic(&cx.name);
            let mut open = true;
            let mut broken = false;
            loop {
                // Between steps: take what arrived, waiting only when there is nothing to step.
                while open && cell.frames_held() < cx.capacity {
                    let got = if cell.is_idle() {
                        // Wakes now and then to free the states of removed streams.
                        match rx.recv_timeout(Duration::from_millis(100)) {
                            Ok(f) => Ok(f),
                            Err(flume::RecvTimeoutError::Timeout) => {
                                cell.tick(cx.clock.as_ref());
                                continue;
                            }
                            Err(flume::RecvTimeoutError::Disconnected) => Err(true),
                        }
                    } else {
                        rx.try_recv()
                            .map_err(|e| matches!(e, flume::TryRecvError::Disconnected))
                    };
                    match got {
                        Ok(f) => {
                            cx.took();
                            if broken {
                                cx.stats.frame_failed_in_stage(cx.stage, f.stream);
                                continue;
                            }
                            let out = cell.admit(f);
                            cx.settle(out);
                        }
                        Err(closed) => {
                            open = !closed;
                            break;
                        }
                    }
                }
                if cell.is_idle() {
                    if open {
                        continue;
                    }
                    break;
                }
                // Steps are counted only where a panic was asked for.
                let inject =
                    panic_at.filter(|at| cx.started.fetch_add(1, Ordering::SeqCst) + 1 == *at);
                match catch_unwind(AssertUnwindSafe(|| {
                    if let Some(n) = inject {
                        panic!("injected by {PANIC_STAGE_ENV} at step {n}");
                    }
                    cell.step(cx.clock.as_ref())
                })) {
                    Ok(out) => {
                        let ran = out.rows > 0;
                        cx.settle(out);
                        if !ran {
                            // Frames held, none runnable now (cannot happen with the shipped
                            // policies); wait for news rather than spin.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    Err(p) => {
                        cx.stats.thread_panicked(thread.clone(), panic_message(&*p));
                        broken = true;
                        for f in cell.take_all() {
                            cx.stats.frame_failed_in_stage(cx.stage, f.stream);
                        }
                    }
                }
            }
        })
}

/// Starts the router of a recurrent stage with several workers: each stream's frames go to one
/// worker, which holds the stream's state.
pub(super) fn spawn_cell_router(
    name: &str,
    stage: usize,
    rx: flume::Receiver<Frame>,
    workers: Vec<flume::Sender<Frame>>,
    room: Arc<Signal>,
    stats: Arc<Stats>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("route-{name}"))
        .spawn(move || {
            for f in rx.iter() {
                room.notify();
                let stream = f.stream;
                if workers[stream % workers.len()].send(f).is_err() {
                    stats.frame_failed_in_stage(stage, stream);
                }
            }
        })
}
