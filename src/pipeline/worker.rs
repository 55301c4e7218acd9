//! A worker of a stage's pool: runs the batches its batcher sends it, in order, and passes the
//! frames on (in dispatch order across the pool) to the next stage or the publisher.
//!
//! A panic while running a batch is caught: the batch's frames count as failed, the panic is
//! recorded (the run then stops and exits with an error), and the worker takes no more work;
//! batches already sent to it count as failed too, so every frame stays accounted for.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::graph::{Batch, Downstream, Sequencer};
use crate::batcher::Hop;
use crate::batcher::deadline::Timeline;
use crate::clock::SharedClock;
use crate::cluster::handoff::Releaser;
use crate::engine::{Pending, StageError, StageRunner};
use crate::frame::Frame;
use crate::panics::panic_message;
use crate::stats::Stats;

/// What a worker passes on for a batch: its frames and the rest of its route, or nothing when
/// the batch failed.
pub(super) type Finished = Option<(Vec<Frame>, Option<Vec<Hop>>)>;

/// Environment variable that makes a stage panic, for testing how a run survives it:
/// `STAGE` or `STAGE:N` (the stage's N-th batch, counted over its pool from 1; default 1; a
/// recurrent stage's N-th step).
pub const PANIC_STAGE_ENV: &str = "POOLPIPE_PANIC_STAGE";

/// What a worker thread shares with the rest of the pipeline.
pub(super) struct WorkerContext {
    /// The stage (index into the pipeline's stages, for counters).
    pub stage: usize,
    /// Its position in its route (for the route's timeline).
    pub hop: usize,
    /// The next stage of the route, if any (for counters).
    pub next_stage: Option<usize>,
    pub name: String,
    pub worker: usize,
    /// This stage's in-flight counters (decremented when a batch is done).
    pub in_flight: Arc<Vec<std::sync::atomic::AtomicUsize>>,
    /// Notified when this worker lets go of a batch.
    pub room: Arc<crate::admission::Signal>,
    /// This stage's unavailable workers (set while a worker's node is down).
    pub down: Arc<Vec<std::sync::atomic::AtomicBool>>,
    pub next: Downstream,
    pub sequencer: Arc<Mutex<Sequencer<Finished>>>,
    pub feedback: flume::Sender<bool>,
    pub timeline: Arc<Mutex<Timeline>>,
    pub stats: Arc<Stats>,
    pub clock: SharedClock,
    /// Batches the stage's pool has started, counted only when [`PANIC_STAGE_ENV`] names it.
    pub started: Arc<AtomicU64>,
    /// Where the frames of a batch that did not run let go of activations other nodes hold
    /// for them.
    pub release: Option<Releaser>,
}

impl WorkerContext {
    /// Lets go of what other nodes hold for `frames`, which go no further.
    fn let_go(&self, frames: &mut [Frame]) {
        if let Some(r) = &self.release {
            frames.iter_mut().for_each(|f| r.release(f));
        }
    }
}

/// The batch number at which stage `name` is asked to panic, if it is.
pub(super) fn injected_panic(name: &str) -> Option<u64> {
    let v = std::env::var(PANIC_STAGE_ENV).ok()?;
    let (stage, n) = match v.split_once(':') {
        Some((s, n)) => (s, n.parse().ok()?),
        None => (v.as_str(), 1),
    };
    (stage == name).then_some(n)
}

pub(super) fn spawn_worker(
    cx: WorkerContext,
    mut runner: Box<dyn StageRunner>,
    rx: flume::Receiver<Batch>,
) -> std::io::Result<JoinHandle<()>> {
    let thread = format!("stage `{}` worker {}", cx.name, cx.worker);
    std::thread::Builder::new()
        .name(format!("{}-{}", cx.name, cx.worker))
        .spawn(move || {
            // A worker on another node leaves its pool's reservations while the node is down.
            let (timeline, hop, worker) = (cx.timeline.clone(), cx.hop, cx.worker);
            let down = cx.down.clone();
            runner.watch(Box::new(move |up| {
                down[worker].store(!up, Ordering::Relaxed);
                timeline
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_available(hop, worker, up);
            }));
            let cx = Arc::new(cx);
            let panic_at = injected_panic(&cx.name);
            let mut broken = false;
            let mut courier = Lane::new("send", 2, pass_on);
            let mut answers = Lane::new("answers", 1, settle_answered);
            for Batch {
                mut frames,
                route,
                seq,
            } in rx.iter()
            {
                let t0 = cx.clock.now();
                let result = if broken {
                    None
                } else {
                    // Batches are counted only where a panic was asked for.
                    let inject =
                        panic_at.filter(|at| cx.started.fetch_add(1, Ordering::SeqCst) + 1 == *at);
                    match catch_unwind(AssertUnwindSafe(|| {
                        if let Some(n) = inject {
                            panic!("injected by {PANIC_STAGE_ENV} at batch {n}");
                        }
                        let next = route.as_ref().and_then(|r| r.get(1)).map(|h| h.worker);
                        match runner.submit(&frames, next) {
                            Some(pending) => Err(pending),
                            None => Ok(runner.run(&mut frames)),
                        }
                    })) {
                        Ok(Ok(r)) => Some(r),
                        // Settled when its outputs come; the worker takes its next batch now
                        // (blocking while the one before the last is still awaited).
                        Ok(Err(pending)) => {
                            let ran = Ran {
                                frames,
                                route,
                                seq,
                                t0,
                                result: None,
                            };
                            answers.hand(&cx, (ran, pending));
                            continue;
                        }
                        Err(p) => {
                            broken = true;
                            cx.stats.thread_panicked(thread.clone(), panic_message(&*p));
                            None
                        }
                    }
                };
                let on_link = runner.sent_at().filter(|_| !broken);
                let (seq, output) = settle(
                    &cx,
                    Ran {
                        frames,
                        route,
                        seq,
                        t0,
                        result,
                    },
                    on_link,
                );
                match on_link {
                    // Never blocks for long: the runner waited for the previous transfer.
                    Some(at) => courier.hand(&cx, (seq, output, at)),
                    None => release(&cx, seq, output),
                }
            }
            answers.finish();
            courier.finish();
        })
}

/// A batch a worker let go of: its frames, the rest of its route, when it started, and what
/// became of it (`None`: the worker panicked on it, or before).
struct Ran {
    frames: Vec<Frame>,
    route: Option<Vec<Hop>>,
    seq: u64,
    t0: crate::clock::Nanos,
    result: Option<Result<(), StageError>>,
}

/// Accounts for a batch the worker let go of; the batch reaches the next stage now, or at
/// `on_link` when the runner sends it while computing the next one. Returns what to release.
fn settle(cx: &WorkerContext, ran: Ran, on_link: Option<Instant>) -> (u64, Finished) {
    let Ran {
        mut frames,
        route,
        seq,
        t0,
        result,
    } = ran;
    let stats = &cx.stats;
    // The worker is free now; the batch reaches the next stage now, or at `sent`.
    let t1 = cx.clock.now();
    let sent = on_link.map_or(t1, |at| {
        t1 + crate::clock::nanos(at.saturating_duration_since(Instant::now()))
    });
    cx.in_flight[cx.worker].fetch_sub(1, Ordering::SeqCst);
    cx.room.notify();
    cx.timeline
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .finished(cx.hop, cx.worker, t1, sent);
    if let Some(r) = &result {
        stats.batch_ran(cx.stage, frames.len(), t1 - t0);
        let earliest = frames.iter().map(|f| f.deadline).min().unwrap_or(u64::MAX);
        let _ = cx.feedback.try_send(sent <= earliest);
        if let Err(e) = r {
            tracing::error!(stage = %cx.name, frames = frames.len(), error = %e, "Batch failed.");
        }
    }
    let output = match result {
        Some(Err(StageError::Lost(_))) => {
            cx.let_go(&mut frames);
            for f in frames {
                stats.frame_lost_in_stage(cx.stage, f.stream);
            }
            None
        }
        Some(Ok(())) => {
            for f in frames.iter_mut() {
                let spent = sent.saturating_sub(f.entered_stage);
                stats.frame_left_stage(cx.stage, spent);
                f.stage_nanos.push(spent);
                f.entered_stage = sent;
            }
            Some((frames, route))
        }
        // An engine error, a panic, or a worker that panicked before.
        _ => {
            cx.let_go(&mut frames);
            for f in frames {
                stats.frame_failed_in_stage(cx.stage, f.stream);
            }
            None
        }
    };
    (seq, output)
}

/// Waits for the outputs of a batch handed to a runner that takes the next one before this
/// one is done, then settles and releases it.
fn settle_answered(cx: &Arc<WorkerContext>, (mut ran, pending): (Ran, Pending)) {
    ran.result = Some(pending(&mut ran.frames));
    let (seq, output) = settle(cx, ran, None);
    release(cx, seq, output);
}

/// Passes a batch on when its transfer ends.
fn pass_on(cx: &Arc<WorkerContext>, (seq, output, at): (u64, Finished, Instant)) {
    crate::clock::sleep_until(at);
    release(cx, seq, output);
}

/// A thread of a worker's own, fed through a bounded queue and started at the first item: the
/// batches still on the link ([`pass_on`]), or those whose outputs are awaited
/// ([`settle_answered`]), in the order handed over. Where the thread cannot start, the worker
/// does that work itself.
struct Lane<T> {
    what: &'static str,
    room: usize,
    each: fn(&Arc<WorkerContext>, T),
    thread: Option<Option<(flume::Sender<T>, JoinHandle<()>)>>,
}

impl<T: Send + 'static> Lane<T> {
    fn new(what: &'static str, room: usize, each: fn(&Arc<WorkerContext>, T)) -> Self {
        Self {
            what,
            room,
            each,
            thread: None,
        }
    }

    /// Hands `item` to the thread, waiting while its queue is full.
    fn hand(&mut self, cx: &Arc<WorkerContext>, item: T) {
        let (what, room, each) = (self.what, self.room, self.each);
        let thread = self.thread.get_or_insert_with(|| {
            let (tx, rx) = flume::bounded::<T>(room);
            let c = cx.clone();
            std::thread::Builder::new()
                .name(format!("{}-{}-{what}", cx.name, cx.worker))
                .spawn(move || rx.iter().for_each(|item| each(&c, item)))
                .inspect_err(|e| tracing::error!(stage = %cx.name, error = %e, "Could not start the worker's {what} thread: the worker does that work itself."))
                .ok()
                .map(|t| (tx, t))
        });
        let item = match thread {
            Some((tx, _)) => match tx.send(item) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => item,
        };
        each(cx, item);
    }

    /// Waits for what was handed over.
    fn finish(self) {
        if let Some(Some((tx, thread))) = self.thread {
            drop(tx);
            let _ = thread.join();
        }
    }
}

/// Releases a finished batch in dispatch order (this one, and any it was holding up),
/// forwarding under the lock so that no other worker can overtake.
fn release(cx: &WorkerContext, seq: u64, output: Finished) {
    let mut sq = cx.sequencer.lock().unwrap_or_else(|e| e.into_inner());
    for (frames, route) in sq.finish(seq, output).into_iter().flatten() {
        forward(cx, frames, route);
    }
}

/// Passes a finished batch on: the rest of a reserved route as a batch to the reserved worker,
/// else frame by frame to the next stage's queue (or the publisher).
fn forward(cx: &WorkerContext, frames: Vec<Frame>, route: Option<Vec<Hop>>) {
    let stats = &cx.stats;
    if let Some(rest) = route.filter(|r| r.len() > 1).map(|r| r[1..].to_vec()) {
        let n = frames.len() as u64;
        let worker = rest[0].worker;
        let batch = Batch {
            frames,
            route: Some(rest),
            seq: 0,
        };
        match cx.next.pool.send_to(worker, batch) {
            Ok(()) => {
                if let Some(next) = cx.next_stage {
                    stats.frames_entered(next, n);
                }
            }
            Err(mut lost) => {
                cx.let_go(&mut lost.frames);
                for f in lost.frames {
                    stats.frame_failed_between_stages(f.stream);
                }
            }
        }
        return;
    }
    for f in frames {
        let stream = f.stream;
        match cx.next.queue.send(f) {
            Ok(()) => {
                if let Some(next) = cx.next_stage {
                    stats.frames_entered(next, 1);
                }
            }
            Err(_) => stats.frame_failed_between_stages(stream),
        }
    }
}
