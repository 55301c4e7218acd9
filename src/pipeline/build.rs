//! Wiring the stage graph: engines for stages, and the threads and queues of a route. The start
//! of a pipeline builds every route this way, and a re-plan ([`super::replan`]) builds the
//! routes of the pipelines it starts the same way while the others run.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::PipelineError;
use super::graph::{Batch, Downstream, Pool, Sequencer, policy_settings, spawn_batcher};
use super::live::StageQueues;
use super::recurrent;
use super::stage::{self, build_runner};
use super::worker::{WorkerContext, spawn_worker};
use crate::admission::RouteEntry;
use crate::batcher::deadline::Timeline;
use crate::batcher::driver::WORKER_QUEUE;
use crate::clock::{SharedClock, SystemClock};
use crate::cluster::link::{Peers, Workers};
use crate::cluster::wire::Sends;
use crate::config::{Device, ModelKind, Pipeline, RouteSpec, StageSpec};
use crate::device::emulated::{Link, new_link};
use crate::engine::StageRunner;
use crate::frame::Frame;
use crate::recurrent::{Recurrent, StreamResets};
use crate::stats::Stats;

/// Threads of the stage graph, with what each is, in the order they were started (joined at
/// shutdown, once everything drained).
pub(super) type Threads = Arc<Mutex<Vec<(String, JoinHandle<()>)>>>;

/// Joins the threads that have ended (the stages of routes a re-plan retired, once drained),
/// counting any that panicked, so that the list does not grow over a long run.
pub(super) fn reap(threads: &Threads, stats: &Stats) {
    let ended: Vec<(String, JoinHandle<()>)> = {
        let mut list = lock(threads);
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|(_, t)| t.is_finished());
        *list = running;
        done
    };
    for (name, t) in ended {
        if let Err(p) = t.join() {
            stats.thread_panicked(name, crate::panics::panic_message(&*p));
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loaded engines of some stages, by stage index, taken as their routes are built.
#[derive(Default)]
pub(super) struct Engines {
    runners: HashMap<usize, Vec<Box<dyn StageRunner>>>,
    cells: HashMap<usize, Vec<Recurrent>>,
}

/// Loads the engines of `stages` (indices into `p.stages`): one per worker. The processes of
/// one emulated device share its link. A worker placed on another node (`[cluster]`) gets a
/// runner that reaches it through `peers`.
pub(super) fn build_engines(
    p: &Pipeline,
    stages: impl IntoIterator<Item = usize>,
    resets: &Arc<StreamResets>,
    peers: Option<&Peers>,
) -> Result<Engines, PipelineError> {
    let mut links: HashMap<String, Link> = HashMap::new();
    let mut out = Engines::default();
    for i in stages {
        let s = &p.stages[i];
        let failed = |source| PipelineError::Engine {
            stage: s.name.clone(),
            source,
        };
        if s.model.kind == ModelKind::Recurrent {
            let mut cells = Vec::new();
            for _ in 0..s.workers {
                let cell = stage::build_recurrent(s, p.onnxruntime.as_deref()).map_err(failed)?;
                cells.push(cell.with_resets(resets.clone()));
            }
            out.cells.insert(i, cells);
            continue;
        }
        let mut pool = Vec::new();
        let carries = sends(p, i);
        let onward = onward(p, i);
        for w in 0..s.workers {
            match s.remote_node(w, p.cluster.as_ref()) {
                Some(node) => {
                    let remote =
                        peers.and_then(|ps| ps.runner(node, &s.name, w, carries, onward.clone()));
                    pool.push(remote.ok_or_else(|| {
                        PipelineError::Cluster(format!(
                            "stage `{}` worker {w} runs on node `{node}`, which this process has no link to",
                            s.name
                        ))
                    })?);
                }
                None => pool.push(local_runner(p, s, w, &mut links, keeps(p, i)).map_err(failed)?),
            }
        }
        out.runners.insert(i, pool);
    }
    Ok(out)
}

/// The engine of worker `w` of stage `s`, run here; `keep`: see [`keeps`].
fn local_runner(
    p: &Pipeline,
    s: &StageSpec,
    w: usize,
    links: &mut HashMap<String, Link>,
    keep: bool,
) -> Result<Box<dyn StageRunner>, crate::engine::EngineError> {
    let link = match (&s.device, s.devices.get(w)) {
        (Device::Emulated { .. }, Some(id)) => {
            Some(links.entry(id.clone()).or_insert_with(new_link).clone())
        }
        _ => None,
    };
    let gpu = stage::gpu_session(s, w, &p.engine_cache);
    build_runner(s, p.onnxruntime.as_deref(), link, gpu, keep)
}

/// Whether stage `i` (run in this process) leaves its activations where its engines computed
/// them: it runs the first blocks of a cut model on ONNX Runtime, and the next stage of every
/// route through it takes them in this process, on ONNX Runtime, on the same side (the host,
/// or GPUs: from one GPU to another they are copied device to device). Otherwise (the next
/// stage on another node, emulated, or across host and GPU) they go to the host as they are
/// computed.
pub(super) fn keeps(p: &Pipeline, i: usize) -> bool {
    let s = &p.stages[i];
    let on_gpu = |d: &Device| matches!(d, Device::Gpu { .. });
    let real = |s: &StageSpec| {
        !matches!(s.device, Device::Emulated { .. })
            && s.model.kind != ModelKind::Recurrent
            && s.model.backend == crate::config::Backend::Onnxruntime
    };
    if !p.keep_activations || !real(s) || s.split.as_ref().is_none_or(|sp| sp.last) {
        return false;
    }
    let mut nexts = p
        .routes
        .iter()
        .filter_map(|r| {
            let k = r.stages.iter().position(|&x| x == i)?;
            Some(r.stages.get(k + 1).copied())
        })
        .peekable();
    nexts.peek().is_some()
        && nexts.all(|n| {
            n.is_some_and(|n| {
                let ns = &p.stages[n];
                real(ns)
                    && ns.split.as_ref().is_some_and(|sp| !sp.first)
                    && on_gpu(&ns.device) == on_gpu(&s.device)
                    && (0..ns.workers).all(|w| ns.remote_node(w, p.cluster.as_ref()).is_none())
            })
        })
}

/// What a batch for stage `i` carries to another node: the activation of a cut model, filler as
/// large as the cut before an emulated stage, or the image for a stage that takes images.
fn sends(p: &Pipeline, i: usize) -> Sends {
    let s = &p.stages[i];
    if let (Device::Emulated { .. }, Some(_)) = (&s.device, &s.profile) {
        let before = p
            .routes
            .iter()
            .find_map(|r| {
                let k = r.stages.iter().position(|&x| x == i)?;
                k.checked_sub(1).map(|k| r.stages[k])
            })
            .and_then(|prev| p.stages[prev].profile.as_ref()?.cut_bytes);
        return Sends::Filler(before.unwrap_or(0));
    }
    match &s.split {
        Some(split) if !split.first => Sends::Activation,
        _ => Sends::Image,
    }
}

/// What becomes of the outputs of stage `i`, run on another node, where the next stage takes
/// them: filler as large as an emulated cut comes back as a real activation would, and with
/// `[cluster] direct_links` an output reserved for a worker on a node goes straight there (the
/// next stage's workers' nodes). `None` where the next stage takes images (they are here).
fn onward(p: &Pipeline, i: usize) -> Option<crate::cluster::link::Onward> {
    let next = p.routes.iter().find_map(|r| {
        let k = r.stages.iter().position(|&x| x == i)?;
        r.stages.get(k + 1).copied()
    })?;
    let n = &p.stages[next];
    let filler = match sends(p, next) {
        Sends::Activation => 0,
        Sends::Filler(b) if b > 0 => b,
        _ => return None,
    };
    let direct = p
        .cluster
        .as_ref()
        .filter(|c| c.direct_links && n.model.kind != ModelKind::Recurrent)
        .map(|c| {
            Arc::new(
                (0..n.workers)
                    .map(|w| n.remote_node(w, Some(c)).map(String::from))
                    .collect(),
            )
        });
    Some(crate::cluster::link::Onward { filler, direct })
}

/// The engines of the workers that `node` runs (its part of a `[cluster]` pipeline), by stage
/// name and worker.
pub fn node_workers(p: &Pipeline, node: &str) -> Result<Workers, PipelineError> {
    node_workers_but(p, node, &|_, _| false)
}

/// The same, but for the workers `have(stage, worker)` says the node already serves.
pub fn node_workers_but(
    p: &Pipeline,
    node: &str,
    have: &dyn Fn(&str, usize) -> bool,
) -> Result<Workers, PipelineError> {
    let mut links: HashMap<String, Link> = HashMap::new();
    let mut out = Workers::new();
    for (i, s) in p.stages.iter().enumerate() {
        // An emulated output that goes on from here crosses a real link (back to the front, or
        // taken by the next stage's node): the device does not emulate its transfer too.
        let real;
        let s = match &s.profile {
            Some(pr) if onward(p, i).is_some() && pr.transfer.iter().any(|t| !t.is_zero()) => {
                let mut r = s.clone();
                if let Some(pr) = r.profile.as_mut() {
                    pr.transfer = vec![Duration::ZERO; pr.transfer.len()];
                }
                real = r;
                &real
            }
            _ => s,
        };
        for w in 0..s.workers {
            if s.nodes.get(w).map(String::as_str) != Some(node) || have(&s.name, w) {
                continue;
            }
            // A node answers its outputs over its link: they go to the host.
            let runner = local_runner(p, s, w, &mut links, false).map_err(|source| {
                PipelineError::Engine {
                    stage: s.name.clone(),
                    source,
                }
            })?;
            out.insert((s.name.clone(), w), runner);
        }
    }
    Ok(out)
}

/// What every route's threads share: the publisher's queue, the counters, the clocks, and the
/// list their threads go into.
pub(super) struct Wiring {
    pub publish: flume::Sender<Frame>,
    pub stats: Arc<Stats>,
    pub clock: SharedClock,
    pub system_clock: SystemClock,
    pub threads: Threads,
    /// Where frames dropped late let go of activations other nodes hold for them (a front
    /// with cluster links).
    pub release: Option<crate::cluster::handoff::Releaser>,
}

/// A built route: the entry its flow's admission sends to, and its stages' queues (by stage
/// index) for status and tuning.
pub(super) struct BuiltRoute {
    pub entry: RouteEntry,
    pub queues: Vec<(usize, StageQueues)>,
}

impl Wiring {
    /// Starts route `ri` of `p`: its stages, last first, each feeding the one after it: frames
    /// one by one through the next stage's queue, or, for a batch with a reserved route, as a
    /// batch straight to the reserved worker of the next stage. The route has its own
    /// reservations (timeline). Takes the stages' engines from `engines`.
    pub fn route(
        &self,
        p: &Pipeline,
        ri: usize,
        engines: &mut Engines,
    ) -> Result<BuiltRoute, PipelineError> {
        let route = &p.routes[ri];
        let timeline = Arc::new(Mutex::new(Timeline::new(
            &route
                .stages
                .iter()
                .map(|i| p.stages[*i].workers)
                .collect::<Vec<_>>(),
        )));
        let mut next = Downstream {
            queue: self.publish.clone(),
            pool: Pool::new(Vec::new()),
        };
        let mut queues = Vec::new();
        let mut threads = lock(&self.threads);
        for (k, &i) in route.stages.iter().enumerate().rev() {
            let spec = &p.stages[i];
            let (in_tx, in_rx) = flume::bounded::<Frame>(spec.queue);
            let chans: Vec<(flume::Sender<Batch>, flume::Receiver<Batch>)> = (0..spec.workers)
                .map(|_| flume::bounded::<Batch>(WORKER_QUEUE))
                .collect();
            let tuner = auto_tuner(p, route, k);
            let mut q = StageQueues {
                input: in_rx.clone(),
                capacity: spec.queue,
                workers: chans.iter().map(|c| c.1.clone()).collect(),
                cells: Vec::new(),
                tuner: tuner.clone(),
                flow: spec.flow,
            };
            let pool = Pool::new(chans.iter().map(|c| c.0.clone()).collect());
            if spec.model.kind == ModelKind::Recurrent {
                q.cells = spawn_cells(
                    &mut threads,
                    i,
                    route.stages.get(k + 1).copied(),
                    spec,
                    engines.cells.remove(&i).unwrap_or_default(),
                    in_rx,
                    &next,
                    &pool,
                    &self.stats,
                    &self.clock,
                )?;
                queues.push((i, q));
                next = Downstream { queue: in_tx, pool };
                continue;
            }
            queues.push((i, q));
            let (fb_tx, fb_rx) = flume::bounded::<bool>(256);
            let sequencer = Arc::new(Mutex::new(Sequencer::default()));
            let started = Arc::new(AtomicU64::new(0));
            threads.push((
                format!("stage `{}` batcher", spec.name),
                spawn_batcher(
                    i,
                    &spec.name,
                    in_rx,
                    pool.clone(),
                    fb_rx,
                    crate::batcher::PolicySettings {
                        knob: tuner.map(|t| t.knob.clone()),
                        ..policy_settings(p, &route.stages, k)
                    },
                    timeline.clone(),
                    self.stats.clone(),
                    self.release.clone(),
                    self.system_clock,
                )?,
            ));
            let runners = engines.runners.remove(&i).unwrap_or_default();
            for (w, (runner, (_, rx))) in runners.into_iter().zip(chans).enumerate() {
                threads.push((
                    format!("stage `{}` worker {w}", spec.name),
                    spawn_worker(
                        WorkerContext {
                            stage: i,
                            hop: k,
                            next_stage: route.stages.get(k + 1).copied(),
                            name: spec.name.clone(),
                            worker: w,
                            in_flight: pool.in_flight.clone(),
                            room: pool.room.clone(),
                            down: pool.down.clone(),
                            next: next.clone(),
                            sequencer: sequencer.clone(),
                            feedback: fb_tx.clone(),
                            timeline: timeline.clone(),
                            stats: self.stats.clone(),
                            clock: self.clock.clone(),
                            started: started.clone(),
                            release: self.release.clone(),
                        },
                        runner,
                        rx,
                    )?,
                ));
            }
            next = Downstream { queue: in_tx, pool };
        }
        Ok(BuiltRoute {
            entry: RouteEntry {
                route: ri,
                first_stage: route.stages[0],
                queue: next.queue,
                weight: route.weight,
                in_flight: next.pool.in_flight,
                room: next.pool.room,
            },
            queues,
        })
    }
}

/// Starts a recurrent stage's workers (and, with several, the router that keeps each stream on
/// one of them); returns each worker's gauges.
#[allow(clippy::too_many_arguments)]
fn spawn_cells(
    threads: &mut Vec<(String, JoinHandle<()>)>,
    stage: usize,
    next_stage: Option<usize>,
    spec: &StageSpec,
    cells: Vec<Recurrent>,
    input: flume::Receiver<Frame>,
    next: &Downstream,
    pool: &Pool,
    stats: &Arc<Stats>,
    clock: &SharedClock,
) -> Result<Vec<Arc<crate::recurrent::CellGauges>>, PipelineError> {
    let capacity = spec.queue.max(2 * spec.max_batch);
    let inputs: Vec<flume::Receiver<Frame>> = if cells.len() > 1 {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..cells.len())
            .map(|_| flume::bounded::<Frame>(spec.max_batch))
            .unzip();
        threads.push((
            format!("stage `{}` router", spec.name),
            recurrent::spawn_cell_router(
                &spec.name,
                stage,
                input,
                txs,
                pool.room.clone(),
                stats.clone(),
            )?,
        ));
        rxs
    } else {
        vec![input]
    };
    let mut gauges = Vec::new();
    let started = Arc::new(AtomicU64::new(0));
    for (w, (cell, rx)) in cells.into_iter().zip(inputs).enumerate() {
        let g = Arc::new(crate::recurrent::CellGauges::default());
        gauges.push(g.clone());
        threads.push((
            format!("stage `{}` worker {w}", spec.name),
            recurrent::spawn_cell_worker(
                recurrent::CellWorker {
                    stage,
                    next_stage,
                    name: spec.name.clone(),
                    worker: w,
                    capacity,
                    next: next.clone(),
                    room: pool.room.clone(),
                    stats: stats.clone(),
                    clock: clock.clone(),
                    started: started.clone(),
                },
                cell.with_gauges(g),
                rx,
            )?,
        ));
    }
    Ok(gauges)
}

/// The tuner of the `k`-th stage of `route` when its batching limits are `"auto"`: its
/// profiled latency, pool and queue; the rest of the route's profiled latency (at each later or
/// earlier stage's largest batch) comes off the flow's SLO; it takes the route's share of its
/// flow's frames.
fn auto_tuner(
    p: &Pipeline,
    route: &RouteSpec,
    k: usize,
) -> Option<Arc<crate::batcher::analytic::Tuner>> {
    let spec = &p.stages[route.stages[k]];
    let prof = spec.profile.as_ref().filter(|_| spec.auto.any())?;
    let ns = |d: &Duration| d.as_nanos() as crate::clock::Nanos;
    let rest: crate::clock::Nanos = route
        .stages
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != k)
        .filter_map(|(_, s)| {
            let s = &p.stages[*s];
            let pr = s.profile.as_ref()?;
            let b = s.max_batch.clamp(1, pr.latency.len());
            Some(
                ns(&pr.latency[b - 1])
                    + pr.transfer.get(b - 1).map_or(0, ns)
                    + pr.receive.get(b - 1).map_or(0, ns),
            )
        })
        .sum();
    // The flow's routes now (a re-plan retires some and adds others).
    let total: f64 = p
        .flows
        .get(route.flow)
        .map_or(0.0, |f| f.routes.iter().map(|r| p.routes[*r].weight).sum());
    let share = if total > 0.0 {
        route.weight / total
    } else {
        1.0
    };
    // A batch that reaches a worker over its own link is counted as held by the worker for
    // that transfer too (receiving while computing is a gain the tuner does not count on).
    let receive = |b: usize| prof.receive.get(b).map_or(0, ns);
    Some(Arc::new(crate::batcher::analytic::Tuner::new(
        prof.latency
            .iter()
            .enumerate()
            .map(|(b, l)| ns(l) + receive(b))
            .collect(),
        spec.workers,
        spec.queue,
        rest,
        share,
        (spec.auto.batch, spec.auto.wait),
        (spec.max_batch, ns(&spec.max_wait)),
    )))
}

#[cfg(test)]
mod tests {
    use super::keeps;
    use std::time::Duration;

    /// The OCR demo with the detector cut in two (its blocks are made by `./setup.sh`).
    fn cut_demo(pipeline: &str, tail: &str) -> crate::config::Pipeline {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        assert!(
            root.join("engines/ppocr/det.blocks/manifest.json")
                .is_file(),
            "run ./setup.sh first: it cuts the detector into blocks"
        );
        let text = format!(
            "[pipeline]\nname = \"keep\"\nslo_ms = 3000\nengines_dir = \"{}\"\n{pipeline}\n\
             [[source]]\nname = \"cam\"\nuri = \"test://ball\"\n\n\
             [[stage]]\nname = \"head\"\nmodel = \"ppocr-det\"\nblocks = [0, 1]\n\n\
             [[stage]]\nname = \"tail\"\nmodel = \"ppocr-det\"\nblocks = [1, 2]\n{tail}\n\n\
             [[stage]]\nname = \"ocr\"\nmodel = \"ppocr-rec\"\n\n\
             [[sink]]\ntype = \"jsonl\"\npath = \"-\"\n",
            root.join("engines").display()
        );
        crate::config::load_pipeline_str(&root.join("keep.toml"), &text).unwrap()
    }

    #[test]
    fn a_cut_keeps_its_activation_only_for_a_next_stage_in_this_process_on_the_same_side() {
        let p = cut_demo("", "");
        assert_eq!(
            (0..3).map(|i| keeps(&p, i)).collect::<Vec<_>>(),
            vec![true, false, false],
            "the head keeps its output for the tail; the tail and the recogniser end their models"
        );
        assert!(
            !keeps(&cut_demo("keep_activations = false", ""), 0),
            "turned off"
        );
        let remote = cut_demo(
            "\n[cluster]\nfront = \"n1\"\nnodes = { n2 = \"127.0.0.1:7000\" }",
            "nodes = [\"n2\"]",
        );
        assert!(
            !keeps(&remote, 0),
            "the tail runs on another node: the output goes on the wire"
        );
        let c = remote.cluster.as_ref().unwrap();
        assert_eq!(
            (c.hold_bytes, c.hold_for),
            (1 << 30, Duration::from_secs(5)),
            "defaults"
        );
        let held = cut_demo(
            "\n[cluster]\nfront = \"n1\"\nhold_mib = 2\nhold_ms = 250\nnodes = { n2 = \"127.0.0.1:7000\" }",
            "nodes = [\"n2\"]",
        );
        let c = held.cluster.as_ref().unwrap();
        assert_eq!(
            (c.hold_bytes, c.hold_for),
            (2 << 20, Duration::from_millis(250))
        );
    }
}
