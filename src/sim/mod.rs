//! A discrete-event simulator: the planner's plans served on a virtual clock by the runtime's
//! own batcher driver (`crate::batcher::driver`), on devices that take their profiled
//! latencies.
//!
//! What is modelled:
//! - every pipeline of a plan as a chain of stage pools; each process of a pool is a worker that
//!   holds a batch for the stage's profiled latency at that batch size (class, share, blocks);
//! - the transfer of a batch to the next stage on its GPU's link: the processes of one GPU
//!   (`share` of them) share one link, first come first served, so the transfer waits while the
//!   link is busy (contention); a worker is held until its batch has been sent, or, where the
//!   stage sends while computing (the plan's `send_while_computing`), until it has handed the
//!   batch to the link (one batch in flight on the link per worker), as in the runtime's
//!   emulated devices;
//! - the batcher of each stage with its bounded queue: `deadline` (reservations over the whole
//!   route, later stages take the reserved worker), `fixed` or `aimd`, the very code the runtime
//!   runs, driven by event times;
//! - arrivals per model (Poisson, bursty, or a trace), split across the model's pipelines in
//!   proportion to their planned throughput (smooth weighted round robin).
//!
//! Not modelled: processes of different stages sharing one GPU (each stage's processes get their
//! own GPUs, `share` per GPU), network switches beyond each GPU's link, decode and
//! post-processing.

pub mod arrivals;
pub mod plot;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::batcher::deadline::{StageCost, Timeline};
use crate::batcher::{
    Deadline, Driver, Hop, Load, PolicyKind, PolicySettings, make_policy, saturated,
};
use crate::clock::Nanos;
use crate::planner::Plan;
use crate::profile::{ProfileError, Profiles};

pub use arrivals::Arrivals;

/// One stage pool of a simulated pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct SimStage {
    /// Profiled latency and transfer per batch size.
    pub cost: StageCost,
    /// Processes.
    pub workers: usize,
    /// Processes per GPU (they share its link).
    pub share: u32,
    /// Index of the device class (into `SimSetup::classes`).
    pub class: usize,
}

/// One pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct SimPipeline {
    /// Index of its model.
    pub model: usize,
    /// Planned batch size.
    pub batch: usize,
    /// Share of the model's arrivals it takes (planned throughput).
    pub weight: f64,
    /// Stages in order.
    pub stages: Vec<SimStage>,
    /// `fixed`/`aimd`: the first stage's longest wait (None: half of what the route leaves of
    /// the SLO).
    pub wait: Option<Nanos>,
}

/// One model.
#[derive(Debug, Clone)]
pub struct SimModel {
    /// Name.
    pub name: String,
    /// Latency budget.
    pub slo: Nanos,
    /// Demand weight.
    pub weight: f64,
    /// Planned frames per second (load 1.0).
    pub planned: f64,
}

/// Everything to simulate.
#[derive(Debug, Clone)]
pub struct SimSetup {
    /// Models.
    pub models: Vec<SimModel>,
    /// Pipelines.
    pub pipelines: Vec<SimPipeline>,
    /// Device classes: name and devices available (for busy shares).
    pub classes: Vec<(String, u32)>,
}

/// Run settings.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Batching policy of every stage.
    pub policy: PolicyKind,
    /// Simulated seconds of arrivals.
    pub duration: f64,
    /// Offered load, a fraction of each model's planned throughput.
    pub load: f64,
    /// Arrival process.
    pub arrivals: Arrivals,
    /// Seed of the arrival process.
    pub seed: u64,
    /// Safety margin of the `deadline` policy.
    pub margin: Nanos,
    /// Frames each stage's queue holds (None: twice a batch per process, at least 64).
    pub queue: Option<usize>,
}

/// What happened to one model's frames.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelResult {
    /// Model.
    pub name: String,
    /// Frames offered.
    pub offered: u64,
    /// Published within the SLO.
    pub on_time: u64,
    /// Finished after the deadline (the runtime's publisher drops these as late).
    pub finished_late: u64,
    /// Dropped by a batcher that saw the deadline could not be met.
    pub dropped_late: u64,
    /// Dropped because a queue was full.
    pub dropped_overload: u64,
    /// `on_time / offered`.
    pub attainment: f64,
    /// On-time frames per second.
    pub goodput: f64,
    /// Latency of finished frames, ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
}

/// Busy share of one device class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassBusy {
    /// Class.
    pub class: String,
    /// Busy device-seconds / (devices available x duration); a process at share s counts 1/s.
    pub busy: f64,
}

/// One simulation run.
#[derive(Debug, Clone, Serialize)]
pub struct SimResult {
    /// Offered load (fraction of planned).
    pub load: f64,
    /// Per model.
    pub models: Vec<ModelResult>,
    /// Over all models: on-time / offered.
    pub attainment: f64,
    /// Smallest per-model attainment.
    pub min_attainment: f64,
    /// On-time frames per second, all models.
    pub goodput: f64,
    /// `min over models of goodput / weight`.
    pub weighted_goodput: f64,
    /// Per device class.
    pub busy: Vec<ClassBusy>,
    /// Events processed.
    pub events: u64,
}

/// A frame in the simulation.
#[derive(Debug, Clone)]
pub struct SimFrame {
    /// When it arrived.
    pub arrival: Nanos,
    /// Arrival + SLO.
    pub deadline: Nanos,
}

impl Deadline for SimFrame {
    fn deadline(&self) -> Nanos {
        self.deadline
    }
}

impl SimSetup {
    /// The simulation of a plan: its pipelines with costs from the profiles.
    pub fn from_plan(plan: &Plan, profiles: &Profiles) -> Result<SimSetup, ProfileError> {
        let classes: Vec<(String, u32)> = plan
            .classes
            .iter()
            .map(|c| (c.class.clone(), c.available))
            .collect();
        let mut models = Vec::new();
        let mut pipelines = Vec::new();
        for (mi, m) in plan.models.iter().enumerate() {
            models.push(SimModel {
                name: m.name.clone(),
                slo: (m.slo_ms * 1e6) as Nanos,
                weight: m.weight,
                planned: m.throughput,
            });
            for p in &m.pipelines {
                let mut stages = Vec::new();
                for (k, st) in p.stages.iter().enumerate() {
                    let last = k + 1 == p.stages.len();
                    let cost = stage_cost(
                        profiles,
                        &m.name,
                        (&st.class, st.share),
                        st.blocks[0]..st.blocks[1],
                        (!last).then_some(plan.bandwidth_gbps),
                    )?;
                    let cost = StageCost {
                        send_while_computing: plan.send_while_computing,
                        ..cost
                    };
                    stages.push(SimStage {
                        cost,
                        workers: st.processes as usize,
                        share: st.share.max(1),
                        class: classes
                            .iter()
                            .position(|(c, _)| *c == st.class)
                            .unwrap_or(0),
                    });
                }
                pipelines.push(SimPipeline {
                    model: mi,
                    batch: p.batch,
                    weight: p.throughput,
                    stages,
                    wait: None,
                });
            }
        }
        Ok(SimSetup {
            models,
            pipelines,
            classes,
        })
    }
}

/// Latency and transfer of blocks `blocks` of `model` on `(class, share)` at every profiled
/// batch size; `send_gbps` is the link when the stage sends its output on (not the last stage).
pub fn stage_cost(
    profiles: &Profiles,
    model: &str,
    (class, share): (&str, u32),
    blocks: std::ops::Range<usize>,
    send_gbps: Option<f64>,
) -> Result<StageCost, ProfileError> {
    let max_b = profiles.timing(model, class, share)?.max_batch();
    let mut cost = StageCost {
        latency: Vec::with_capacity(max_b),
        transfer: Vec::with_capacity(max_b),
        send_while_computing: false,
        receive: Vec::new(),
    };
    for b in 1..=max_b {
        let l = profiles.latency(model, class, share, blocks.clone(), b)?;
        cost.latency.push(l.as_nanos() as Nanos);
        let t = match send_gbps {
            Some(g) => profiles.transfer(model, blocks.end - 1, b, g)?.as_nanos() as Nanos,
            None => 0,
        };
        cost.transfer.push(t);
    }
    Ok(cost)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A worker finished computing: (pipeline, stage, worker).
    Computed(usize, usize, usize),
    /// A worker finished computing and sending: (pipeline, stage, worker).
    Done(usize, usize, usize),
    /// A worker that sends while computing may hand its computed batch to the link (its previous
    /// transfer ended): (pipeline, stage, worker).
    HandOff(usize, usize, usize),
    /// The oldest batch a worker handed to its link arrived: (pipeline, stage, worker).
    Sent(usize, usize, usize),
    /// The next frame of a model arrives.
    Arrive(usize),
    /// A batcher asked to look again: (pipeline, stage).
    Wake(usize, usize),
    /// The supervisor looks at the run.
    Look,
    /// A new plan takes over (index into the plans the supervisor handed in).
    Apply(usize),
}

/// Watches a run and may change its plan: the online control plane, on the simulator's clock.
pub trait Supervisor {
    /// How often it looks.
    fn interval(&self) -> Nanos;
    /// Looks at the run at `now` (each model's counts so far: `offered` is every arrival) and
    /// returns the plan that takes over, and when (at or after `now`), if it changes it.
    fn look(&mut self, now: Nanos, seen: &[ModelResult]) -> Option<(Nanos, SimSetup)>;
}

type Batch = (Vec<SimFrame>, Option<Vec<Hop>>);

struct Worker {
    queue: VecDeque<Batch>,
    running: Option<Batch>,
    /// When the running batch started.
    started: Nanos,
    /// Batches handed to the link and not yet arrived (workers that send while computing).
    sending: VecDeque<Batch>,
    /// When the worker's last transfer ends.
    sending_until: Nanos,
    in_flight: usize,
    busy: Nanos,
}

/// The batches in flight of a stage's simulated workers, as the batcher driver reads them.
struct InFlight<'a>(&'a [Worker]);

impl Load for InFlight<'_> {
    fn workers(&self) -> usize {
        self.0.len()
    }
    fn of(&self, worker: usize) -> usize {
        self.0[worker].in_flight
    }
}

struct PipeState {
    /// One batcher per stage: the runtime's driver.
    batchers: Vec<Driver<SimFrame>>,
    queues: Vec<VecDeque<SimFrame>>,
    capacity: Vec<usize>,
    workers: Vec<Vec<Worker>>,
    /// Per stage, per GPU: when its link is free.
    links: Vec<Vec<Nanos>>,
    timeline: Arc<Mutex<Timeline>>,
    wake_at: Vec<Option<Nanos>>,
}

struct Sim<'a> {
    models: &'a [SimModel],
    /// Every pipeline that ran: those of the first plan, then those each new plan added.
    pipelines: Vec<SimPipeline>,
    /// The pipelines that take new frames (the current plan's).
    active: Vec<bool>,
    splitters: Vec<Splitter>,
    routed: bool,
    pipes: Vec<PipeState>,
    heap: BinaryHeap<Reverse<(Nanos, u64, Event)>>,
    seq: u64,
    horizon: Nanos,
    stats: Vec<ModelResult>,
    latencies: Vec<Vec<u32>>,
    /// Every dispatch, when tracing.
    trace: Option<Vec<Dispatched>>,
}

/// One batch dispatched by a stage's batcher (for comparing the simulator with the runtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    /// When.
    pub at: Nanos,
    /// Pipeline index.
    pub pipeline: usize,
    /// Stage index.
    pub stage: usize,
    /// Worker of the stage.
    pub worker: usize,
    /// Frames in the batch.
    pub size: usize,
}

impl Sim<'_> {
    fn push(&mut self, at: Nanos, ev: Event) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    /// Starts the next queued batch of an idle worker.
    fn start(&mut self, p: usize, s: usize, w: usize, now: Nanos) {
        let wk = &mut self.pipes[p].workers[s][w];
        if wk.running.is_some() {
            return;
        }
        if let Some(batch) = wk.queue.pop_front() {
            let b = batch.0.len();
            let hold = self.pipelines[p].stages[s].cost.latency[b - 1];
            wk.running = Some(batch);
            wk.started = now;
            self.push(now + hold, Event::Computed(p, s, w));
        }
    }

    /// A worker's batch is done and has arrived at the next stage: the worker takes its next.
    fn finish(&mut self, p: usize, s: usize, w: usize, now: Nanos) {
        let batch = self.pipes[p].workers[s][w]
            .running
            .take()
            .expect("a running batch");
        self.free_worker(p, s, w, now, now);
        let touched_next = self.deliver(p, s, batch, now);
        self.start(p, s, w, now);
        self.pump(p, s, now);
        if touched_next {
            self.pump(p, s + 1, now);
        }
    }

    /// A worker that sends while computing hands its batch to its GPU's link (shared by the
    /// GPU's processes, first come first served) and takes its next batch.
    fn hand_off(&mut self, p: usize, s: usize, w: usize, now: Nanos) {
        let stage = &self.pipelines[p].stages[s];
        let wk = &mut self.pipes[p].workers[s][w];
        let batch = wk.running.take().expect("a running batch");
        let transfer = stage.cost.transfer[batch.0.len() - 1];
        let horizon = self.horizon;
        wk.busy += now.min(horizon).saturating_sub(wk.started.min(horizon));
        let link = &mut self.pipes[p].links[s][w / stage.share as usize];
        let end = (*link).max(now) + transfer;
        *link = end;
        let wk = &mut self.pipes[p].workers[s][w];
        wk.sending_until = end;
        wk.sending.push_back(batch);
        self.push(end, Event::Sent(p, s, w));
        self.free_worker(p, s, w, now, end);
        self.start(p, s, w, now);
        self.pump(p, s, now);
    }

    /// A worker let go of its batch at `now`; the batch arrives at the next stage at `sent`.
    fn free_worker(&mut self, p: usize, s: usize, w: usize, now: Nanos, sent: Nanos) {
        self.pipes[p].workers[s][w].in_flight -= 1;
        self.pipes[p]
            .timeline
            .lock()
            .unwrap()
            .finished(s, w, now, sent);
    }

    /// A batch of stage `s` arrives where it goes next: published after the last stage, else
    /// the reserved worker of the next stage or its queue (then returns true: the next stage's
    /// batcher has frames to look at).
    fn deliver(&mut self, p: usize, s: usize, (frames, route): Batch, now: Nanos) -> bool {
        let earliest = frames
            .iter()
            .map(|f| f.deadline)
            .min()
            .unwrap_or(Nanos::MAX);
        self.pipes[p].batchers[s].feedback(now <= earliest);
        let model = self.pipelines[p].model;
        let last = self.pipelines[p].stages.len() - 1;
        if s == last {
            let st = &mut self.stats[model];
            for f in frames {
                self.latencies[model].push(((now - f.arrival) / 1000).min(u32::MAX as u64) as u32);
                if now <= f.deadline {
                    st.on_time += 1;
                } else {
                    st.finished_late += 1;
                }
            }
            false
        } else if let Some(rest) = route.filter(|r| r.len() > 1).map(|r| r[1..].to_vec()) {
            let nw = rest[0].worker;
            let wk = &mut self.pipes[p].workers[s + 1][nw];
            wk.in_flight += 1;
            wk.queue.push_back((frames, Some(rest)));
            self.start(p, s + 1, nw, now);
            false
        } else {
            for f in frames {
                let ps = &mut self.pipes[p];
                if ps.queues[s + 1].len() >= ps.capacity[s + 1] {
                    self.stats[model].dropped_overload += 1;
                } else {
                    ps.queues[s + 1].push_back(f);
                }
            }
            true
        }
    }

    /// Lets a stage's batcher pull, drop and dispatch, as the runtime's batcher thread does.
    fn pump(&mut self, p: usize, s: usize, now: Nanos) {
        if self.routed && s > 0 {
            return;
        }
        let model = self.pipelines[p].model;
        loop {
            let ps = &mut self.pipes[p];
            let load = InFlight(&ps.workers[s]);
            // Without reservations a batch goes only while a worker has room: the runtime's
            // worker channels hold two batches besides the running one, and its batcher waits
            // when they are full. (A finishing worker pumps again, so no wake-up is needed then.)
            if !self.routed && saturated(&load) {
                return;
            }
            let drv = &mut ps.batchers[s];
            while drv.room() > 0 {
                match ps.queues[s].pop_front() {
                    Some(f) => drv.push(f, now),
                    None => break,
                }
            }
            let step = drv.step(now, false, &load);
            self.stats[model].dropped_late += step.late.len() as u64;
            let Some(a) = step.dispatch else { break };
            if let Some(t) = self.trace.as_mut() {
                t.push(Dispatched {
                    at: now,
                    pipeline: p,
                    stage: s,
                    worker: a.worker,
                    size: a.items.len(),
                });
            }
            let wk = &mut self.pipes[p].workers[s][a.worker];
            wk.in_flight += 1;
            wk.queue.push_back((a.items, a.route));
            self.start(p, s, a.worker, now);
        }
        let ps = &mut self.pipes[p];
        if let Some(t) = ps.batchers[s].next_wakeup()
            && ps.wake_at[s].is_none_or(|x| t < x)
        {
            let t = t.max(now);
            ps.wake_at[s] = Some(t);
            self.push(t, Event::Wake(p, s));
        }
    }
}

/// A model's pipelines, picked by smooth weighted round robin on their planned throughput.
struct Splitter {
    pipes: Vec<usize>,
    wrr: crate::wrr::SmoothWrr,
}

impl Splitter {
    fn next(&mut self) -> usize {
        self.pipes[self.wrr.pick()]
    }
}

impl SimSetup {
    /// One model with latency budget `slo` on one pipeline of these stages (cost and workers;
    /// each stage its own device class, `stage0`, `stage1`, ...), at batch `batch`, the first
    /// stage waiting at most `wait` under `fixed`/`aimd` (None: half the slack).
    pub fn one_model(
        slo: Nanos,
        batch: usize,
        wait: Option<Nanos>,
        stages: &[(StageCost, usize)],
    ) -> Self {
        SimSetup {
            models: vec![SimModel {
                name: "model".into(),
                slo,
                weight: 1.0,
                planned: 0.0,
            }],
            pipelines: vec![SimPipeline {
                model: 0,
                batch,
                weight: 1.0,
                stages: stages
                    .iter()
                    .enumerate()
                    .map(|(i, (cost, workers))| SimStage {
                        cost: cost.clone(),
                        workers: *workers,
                        share: 1,
                        class: i,
                    })
                    .collect(),
                wait,
            }],
            classes: stages
                .iter()
                .enumerate()
                .map(|(i, (_, w))| (format!("stage{i}"), *w as u32))
                .collect(),
        }
    }
}

/// The batching settings of stage `i` of a simulated pipeline whose model has latency budget
/// `slo`: `deadline` reserves the route through every later stage; `fixed`/`aimd` are tuned for
/// the SLO: the planned batch, the first stage waits at most half of what the route leaves of
/// the SLO, later stages take what has arrived.
pub fn policy_settings(
    pl: &SimPipeline,
    slo: Nanos,
    i: usize,
    opts: &SimOptions,
) -> PolicySettings {
    let route: Nanos = pl
        .stages
        .iter()
        .map(|s| {
            let b = pl.batch.min(s.cost.latency.len()).max(1);
            s.cost.latency[b - 1] + s.cost.transfer[b - 1]
        })
        .sum();
    let slack = slo.saturating_sub(route);
    PolicySettings {
        kind: opts.policy,
        stage: i,
        max_batch: pl.batch,
        max_wait: match (i, pl.wait) {
            (0, Some(w)) => w,
            (0, None) => slack / 2,
            _ => 0,
        },
        margin: opts.margin,
        costs: pl.stages[i..].iter().map(|s| s.cost.clone()).collect(),
        knob: None,
    }
}

/// Runs one simulation.
pub fn simulate(setup: &SimSetup, opts: &SimOptions) -> SimResult {
    let duration = (opts.duration * 1e9) as Nanos;
    let times: Vec<Vec<Nanos>> = setup
        .models
        .iter()
        .enumerate()
        .map(|(m, model)| {
            opts.arrivals.times(
                m,
                &model.name,
                model.planned * opts.load,
                duration,
                opts.seed.wrapping_add(m as u64 * 7919),
            )
        })
        .collect();
    simulate_times(setup, opts, &times, duration)
}

/// Runs one simulation on given arrival times per model.
pub fn simulate_times(
    setup: &SimSetup,
    opts: &SimOptions,
    times: &[Vec<Nanos>],
    duration: Nanos,
) -> SimResult {
    simulate_inner(setup, opts, times, duration, false).0
}

/// [`simulate_times`], also returning every batch each stage's batcher dispatched, in order.
pub fn simulate_traced(
    setup: &SimSetup,
    opts: &SimOptions,
    times: &[Vec<Nanos>],
    duration: Nanos,
) -> (SimResult, Vec<Dispatched>) {
    let (r, t) = simulate_inner(setup, opts, times, duration, true);
    (r, t.unwrap_or_default())
}

fn simulate_inner(
    setup: &SimSetup,
    opts: &SimOptions,
    times: &[Vec<Nanos>],
    duration: Nanos,
    trace: bool,
) -> (SimResult, Option<Vec<Dispatched>>) {
    run_sim(setup, opts, times, duration, trace, None)
}

/// Runs one simulation on given arrival times per model, with a supervisor that may change the
/// plan while it runs. The pipelines of a new plan that the running one already has (same
/// model, batch and stages with their process counts) keep running as they are; the others
/// stop taking frames and finish what they hold, and the new ones start empty.
pub fn simulate_supervised(
    setup: &SimSetup,
    opts: &SimOptions,
    times: &[Vec<Nanos>],
    duration: Nanos,
    supervisor: &mut dyn Supervisor,
) -> SimResult {
    run_sim(setup, opts, times, duration, false, Some(supervisor)).0
}

fn pipe_state(pl: &SimPipeline, slo: Nanos, opts: &SimOptions) -> PipeState {
    let timeline = Arc::new(Mutex::new(Timeline::new(
        &pl.stages
            .iter()
            .map(|s| s.workers.max(1))
            .collect::<Vec<_>>(),
    )));
    let batchers = (0..pl.stages.len())
        .map(|i| {
            Driver::new(make_policy(
                policy_settings(pl, slo, i, opts),
                timeline.clone(),
            ))
        })
        .collect();
    PipeState {
        batchers,
        queues: pl.stages.iter().map(|_| VecDeque::new()).collect(),
        capacity: pl
            .stages
            .iter()
            .map(|s| {
                opts.queue
                    .unwrap_or((2 * s.workers.max(1) * pl.batch).max(64))
            })
            .collect(),
        workers: pl
            .stages
            .iter()
            .map(|s| {
                (0..s.workers.max(1))
                    .map(|_| Worker {
                        queue: VecDeque::new(),
                        running: None,
                        started: 0,
                        sending: VecDeque::new(),
                        sending_until: 0,
                        in_flight: 0,
                        busy: 0,
                    })
                    .collect()
            })
            .collect(),
        links: pl
            .stages
            .iter()
            .map(|s| vec![0; s.workers.max(1).div_ceil(s.share as usize)])
            .collect(),
        timeline,
        wake_at: vec![None; pl.stages.len()],
    }
}

/// Each model's active pipelines, weighted by their planned throughput.
fn splitters(models: usize, pipelines: &[SimPipeline], active: &[bool]) -> Vec<Splitter> {
    (0..models)
        .map(|m| {
            let pipes: Vec<usize> = (0..pipelines.len())
                .filter(|&p| {
                    active[p] && pipelines[p].model == m && !pipelines[p].stages.is_empty()
                })
                .collect();
            let weights: Vec<f64> = pipes
                .iter()
                .map(|&p| pipelines[p].weight.max(1e-9))
                .collect();
            Splitter {
                pipes,
                wrr: crate::wrr::SmoothWrr::new(weights),
            }
        })
        .collect()
}

impl Sim<'_> {
    /// A new plan takes over at `now`.
    fn apply(&mut self, next: &SimSetup, opts: &SimOptions) {
        let before = self.pipelines.len();
        let mut keep = vec![false; before];
        for pl in &next.pipelines {
            let same = (0..before).find(|&p| {
                self.active[p] && !keep[p] && {
                    let old = &self.pipelines[p];
                    old.model == pl.model
                        && old.batch == pl.batch
                        && old.wait == pl.wait
                        && old.stages == pl.stages
                }
            });
            match same {
                Some(p) => {
                    keep[p] = true;
                    self.pipelines[p].weight = pl.weight;
                }
                None => {
                    self.pipes
                        .push(pipe_state(pl, self.models[pl.model].slo, opts));
                    self.pipelines.push(pl.clone());
                    keep.push(true);
                }
            }
        }
        self.active = keep;
        self.splitters = splitters(self.models.len(), &self.pipelines, &self.active);
    }
}

fn run_sim(
    setup: &SimSetup,
    opts: &SimOptions,
    times: &[Vec<Nanos>],
    duration: Nanos,
    trace: bool,
    mut supervisor: Option<&mut dyn Supervisor>,
) -> (SimResult, Option<Vec<Dispatched>>) {
    let routed = opts.policy == PolicyKind::Deadline;
    let pipes: Vec<PipeState> = setup
        .pipelines
        .iter()
        .map(|pl| pipe_state(pl, setup.models[pl.model].slo, opts))
        .collect();
    let active = vec![true; setup.pipelines.len()];
    let mut sim = Sim {
        models: &setup.models,
        splitters: splitters(setup.models.len(), &setup.pipelines, &active),
        pipelines: setup.pipelines.clone(),
        active,
        routed,
        pipes,
        heap: BinaryHeap::new(),
        seq: 0,
        horizon: duration,
        stats: setup
            .models
            .iter()
            .map(|m| ModelResult {
                name: m.name.clone(),
                ..Default::default()
            })
            .collect(),
        latencies: vec![Vec::new(); setup.models.len()],
        trace: trace.then(Vec::new),
    };
    let mut plans: Vec<SimSetup> = Vec::new();
    if let Some(sup) = supervisor.as_ref() {
        sim.push(sup.interval().max(1), Event::Look);
    }
    let mut next_arrival = vec![0usize; setup.models.len()];
    for (m, t) in times.iter().enumerate() {
        if let Some(&first) = t.first() {
            sim.push(first, Event::Arrive(m));
        }
    }
    let mut events = 0u64;
    while let Some(Reverse((now, _, ev))) = sim.heap.pop() {
        events += 1;
        match ev {
            Event::Arrive(m) => {
                let i = next_arrival[m];
                next_arrival[m] += 1;
                if let Some(&t) = times[m].get(i + 1) {
                    sim.push(t, Event::Arrive(m));
                }
                sim.stats[m].offered += 1;
                if sim.splitters[m].pipes.is_empty() {
                    sim.stats[m].dropped_overload += 1;
                    continue;
                }
                let p = sim.splitters[m].next();
                let f = SimFrame {
                    arrival: now,
                    deadline: now + setup.models[m].slo,
                };
                let ps = &mut sim.pipes[p];
                if ps.queues[0].len() >= ps.capacity[0] {
                    sim.stats[m].dropped_overload += 1;
                } else {
                    ps.queues[0].push_back(f);
                }
                sim.pump(p, 0, now);
            }
            Event::Wake(p, s) => {
                if sim.pipes[p].wake_at[s] == Some(now) {
                    sim.pipes[p].wake_at[s] = None;
                }
                sim.pump(p, s, now);
            }
            Event::Computed(p, s, w) => {
                let stage = &sim.pipelines[p].stages[s];
                let wk = &sim.pipes[p].workers[s][w];
                let b = wk.running.as_ref().map_or(1, |r| r.0.len());
                let transfer = stage.cost.transfer[b - 1];
                let send_while_computing = stage.cost.send_while_computing;
                let share = stage.share as usize;
                let started = wk.started;
                let horizon = sim.horizon;
                if transfer == 0 {
                    sim.pipes[p].workers[s][w].busy +=
                        (now.min(horizon)).saturating_sub(started.min(horizon));
                    sim.finish(p, s, w, now);
                } else if send_while_computing {
                    // One batch in flight on the link per worker: wait for the previous one.
                    let until = wk.sending_until;
                    if until > now {
                        sim.push(until, Event::HandOff(p, s, w));
                    } else {
                        sim.hand_off(p, s, w, now);
                    }
                } else {
                    // The GPU's link, shared by its processes, first come first served.
                    let gpu = w / share;
                    let link = &mut sim.pipes[p].links[s][gpu];
                    let send = (*link).max(now);
                    *link = send + transfer;
                    let end = send + transfer;
                    sim.pipes[p].workers[s][w].busy +=
                        (end.min(horizon)).saturating_sub(started.min(horizon));
                    sim.push(end, Event::Done(p, s, w));
                }
            }
            Event::HandOff(p, s, w) => sim.hand_off(p, s, w, now),
            Event::Sent(p, s, w) => {
                let batch = sim.pipes[p].workers[s][w]
                    .sending
                    .pop_front()
                    .expect("a batch on the link");
                if sim.deliver(p, s, batch, now) {
                    sim.pump(p, s + 1, now);
                }
            }
            Event::Done(p, s, w) => sim.finish(p, s, w, now),
            Event::Look => {
                let Some(sup) = supervisor.as_mut() else {
                    continue;
                };
                if let Some((at, next)) = sup.look(now, &sim.stats) {
                    plans.push(next);
                    sim.push(at.max(now), Event::Apply(plans.len() - 1));
                }
                let next = now + sup.interval().max(1);
                if next < duration {
                    sim.push(next, Event::Look);
                }
            }
            Event::Apply(i) => sim.apply(&plans[i], opts),
        }
    }
    // Results.
    let secs = duration as f64 / 1e9;
    let mut models = sim.stats;
    for (m, r) in models.iter_mut().enumerate() {
        let lat = &mut sim.latencies[m];
        lat.sort_unstable();
        let q = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |v| *v as f64 / 1e3)
        };
        r.p50_ms = q(0.5);
        r.p99_ms = q(0.99);
        r.attainment = if r.offered > 0 {
            r.on_time as f64 / r.offered as f64
        } else {
            1.0
        };
        r.goodput = r.on_time as f64 / secs;
    }
    let mut busy = vec![0.0f64; setup.classes.len()];
    for (pl, ps) in sim.pipelines.iter().zip(&sim.pipes) {
        for (st, ws) in pl.stages.iter().zip(&ps.workers) {
            busy[st.class] += ws.iter().map(|w| w.busy as f64).sum::<f64>() / st.share as f64;
        }
    }
    let offered: u64 = models.iter().map(|m| m.offered).sum();
    let on_time: u64 = models.iter().map(|m| m.on_time).sum();
    let result = SimResult {
        load: opts.load,
        attainment: if offered > 0 {
            on_time as f64 / offered as f64
        } else {
            1.0
        },
        min_attainment: models.iter().map(|m| m.attainment).fold(1.0, f64::min),
        goodput: on_time as f64 / secs,
        weighted_goodput: models
            .iter()
            .zip(&setup.models)
            .map(|(r, m)| r.goodput / m.weight)
            .fold(f64::INFINITY, f64::min),
        busy: setup
            .classes
            .iter()
            .zip(busy)
            .map(|((c, n), b)| ClassBusy {
                class: c.clone(),
                busy: if *n > 0 {
                    b / (*n as f64 * duration as f64)
                } else {
                    0.0
                },
            })
            .collect(),
        models,
        events,
    };
    (result, sim.trace)
}

/// The highest load (fraction of planned) at which every model's attainment is at least
/// `target`, by bisection over `[lo, hi]` in `steps` halvings, and the run at that load.
pub fn find_load(
    setup: &SimSetup,
    opts: &SimOptions,
    target: f64,
    lo: f64,
    hi: f64,
    steps: usize,
    mut progress: impl FnMut(&SimResult),
) -> SimResult {
    let run = |load: f64| {
        simulate(
            setup,
            &SimOptions {
                load,
                ..opts.clone()
            },
        )
    };
    let mut best: Option<SimResult> = None;
    let (mut lo, mut hi) = (lo, hi);
    // First check the top: plans often hold there.
    let top = run(hi);
    progress(&top);
    if top.min_attainment >= target {
        return top;
    }
    for _ in 0..steps {
        let mid = (lo + hi) / 2.0;
        let r = run(mid);
        progress(&r);
        if r.min_attainment >= target {
            lo = mid;
            best = Some(r);
        } else {
            hi = mid;
        }
    }
    best.unwrap_or_else(|| {
        let r = run(lo);
        progress(&r);
        r
    })
}

/// A human-readable table of one run.
pub fn table(r: &SimResult, plan: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "load {:.3} of planned: attainment {:.4} (lowest model {:.4}), goodput {:.1} frames/s, min goodput/weight {:.1} (planned objective {:.1})",
        r.load, r.attainment, r.min_attainment, r.goodput, r.weighted_goodput, plan.objective
    );
    let _ = writeln!(
        s,
        "{:<44} {:>9} {:>9} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "model",
        "offered",
        "on_time",
        "attain",
        "goodput",
        "p50_ms",
        "p99_ms",
        "drop_late",
        "overload",
        "late_fin"
    );
    for m in &r.models {
        let _ = writeln!(
            s,
            "{:<44} {:>9} {:>9} {:>8.4} {:>10.1} {:>8.2} {:>8.2} {:>8} {:>8} {:>8}",
            m.name,
            m.offered,
            m.on_time,
            m.attainment,
            m.goodput,
            m.p50_ms,
            m.p99_ms,
            m.dropped_late,
            m.dropped_overload,
            m.finished_late
        );
    }
    for c in &r.busy {
        let _ = writeln!(s, "busy share of {}: {:.1}%", c.class, c.busy * 100.0);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::batcher::script::{ScriptInbox, ScriptOutbox};
    use crate::batcher::thread;
    use crate::clock::ManualClock;

    const US: Nanos = 1_000;

    /// One model, one single-stage pipeline of `workers` processes.
    fn setup(workers: usize, batch: usize, slo: Nanos) -> SimSetup {
        SimSetup {
            models: vec![SimModel {
                name: "m".into(),
                slo,
                weight: 1.0,
                planned: 100.0,
            }],
            pipelines: vec![SimPipeline {
                model: 0,
                batch,
                weight: 1.0,
                stages: vec![SimStage {
                    // Odd nanoseconds, so that no finish falls on an arrival or a wake-up.
                    cost: StageCost {
                        latency: (1..=8).map(|b| 3_000_017 + b * 1_370_003).collect(),
                        transfer: vec![0; 8],
                        send_while_computing: false,
                        receive: Vec::new(),
                    },
                    workers,
                    share: 1,
                    class: 0,
                }],
                wait: None,
            }],
            classes: vec![("c".into(), workers as u32)],
        }
    }

    /// Arrival times with irregular gaps (0.1 to 3 ms) from a fixed linear congruential sequence.
    fn arrivals(n: usize) -> Vec<Nanos> {
        let mut x: u64 = 12345;
        let mut t = 0;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                t += 100 * US + (x >> 33) % (2900 * US);
                t
            })
            .collect()
    }

    /// The same arrivals through the runtime's batcher loop (scripted channel, manual clock,
    /// workers that take the profiled latency) and through the simulator give the same
    /// dispatches: same times, same workers, same sizes.
    fn agree(policy: PolicyKind, workers: usize) {
        let slo = 40_000 * US;
        let s = setup(workers, 4, slo);
        let opts = SimOptions {
            policy,
            duration: 2.0,
            load: 1.0,
            arrivals: Arrivals::Poisson,
            seed: 1,
            margin: 2_000 * US,
            queue: Some(100_000),
        };
        let times = arrivals(600);
        let (_, sim) = simulate_traced(&s, &opts, std::slice::from_ref(&times), 2_000_000_000);

        let pl = &s.pipelines[0];
        let timeline = Arc::new(Mutex::new(Timeline::new(&[workers])));
        let mut driver: Driver<SimFrame> = Driver::new(make_policy(
            policy_settings(pl, slo, 0, &opts),
            timeline.clone(),
        ));
        let clock = Arc::new(ManualClock::new(0));
        let mut inbox = ScriptInbox {
            arrivals: times
                .iter()
                .map(|&t| {
                    (
                        t,
                        SimFrame {
                            arrival: t,
                            deadline: t + slo,
                        },
                    )
                })
                .collect::<VecDeque<_>>(),
            clock: clock.clone(),
        };
        let mut outbox = ScriptOutbox::new(
            clock.clone(),
            pl.stages[0].cost.latency.clone(),
            workers,
            timeline,
        );
        thread::run(&mut driver, &*clock, &mut inbox, &mut outbox);
        let runtime: Vec<(Nanos, usize, usize)> = outbox
            .sent
            .iter()
            .map(|b| (b.at, b.worker, b.items.len()))
            .collect();
        let sim: Vec<(Nanos, usize, usize)> =
            sim.iter().map(|d| (d.at, d.worker, d.size)).collect();
        assert!(runtime.len() > 100, "{} batches", runtime.len());
        assert!(
            runtime.iter().any(|b| b.2 > 1),
            "some batching happened: {runtime:?}"
        );
        let workers_used: std::collections::BTreeSet<usize> = runtime.iter().map(|b| b.1).collect();
        assert!(workers_used.len() > 1, "more than one worker was chosen");
        let first_diff = runtime.iter().zip(&sim).position(|(a, b)| a != b);
        assert_eq!(
            first_diff,
            None,
            "first difference at batch {first_diff:?}: runtime {:?} vs simulator {:?}",
            first_diff.map(|i| runtime[i]),
            first_diff.map(|i| sim[i])
        );
        assert_eq!(runtime.len(), sim.len());
    }

    #[test]
    fn an_overloaded_pool_waits_for_a_worker_without_spinning() {
        // One worker, arrivals far faster than it serves: its channel fills, late batches shrink
        // AIMD's batch below what its batcher holds, and the rest falls due while the worker is
        // full. The simulator must then wait for the worker (a finish), not wake itself at the
        // same instant again and again.
        let s = setup(1, 4, 20_000 * US);
        let opts = SimOptions {
            policy: PolicyKind::Aimd,
            duration: 1.0,
            load: 1.0,
            arrivals: Arrivals::Poisson,
            seed: 1,
            margin: 0,
            queue: Some(64),
        };
        let times: Vec<Nanos> = (0..5_000).map(|i| i * 200 * US).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(simulate_times(&s, &opts, &[times], 1_000_000_000));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the simulation ends (it takes milliseconds)");
        let m = &r.models[0];
        assert_eq!(m.offered, 5_000);
        assert!(m.dropped_overload > 0, "{m:?}");
        assert!(r.events < 20_000, "{} events for 5000 frames", r.events);
    }

    #[test]
    fn runtime_and_simulator_dispatch_alike_fixed() {
        agree(PolicyKind::Fixed, 3);
    }

    #[test]
    fn runtime_and_simulator_dispatch_alike_aimd() {
        agree(PolicyKind::Aimd, 3);
    }

    #[test]
    fn runtime_and_simulator_dispatch_alike_deadline() {
        agree(PolicyKind::Deadline, 2);
    }
}
