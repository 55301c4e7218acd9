//! Recurrent stages: a model of one cell step, run step by step with per-stream or per-item
//! state, under cellular (or padded) batching.
//!
//! - **Per-stream state** (`mode = "stream"`): each frame of a stream is one step; the stream's
//!   state is kept here between its frames, starts from zeros (or the model's initial state)
//!   when the stream starts, again when it reconnects or is added anew, and is freed when it is
//!   removed. A frame dropped before this stage never reaches it, so it does not advance the
//!   state; nor does one dropped here.
//! - **Per-item decoding** (`mode = "decode"`): each item (the frame, or each box of an earlier
//!   stage) runs steps from a fresh state until the cell emits the end token or the item has run
//!   its step limit; the frame is complete when all its items ended.
//!
//! [`Recurrent`] holds the cell, the [`CellScheduler`] and every item's state; the pipeline's
//! worker thread (or a test, or `poolpipe bench recurrent`) admits frames and calls
//! [`Recurrent::step`]. Frames leave in the order they came, per stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};

use crate::batcher::cell::{CellBatching, CellItem, CellScheduler};
use crate::clock::{Clock, Nanos};
use crate::config::cell::{CellIo, resolve_io};
use crate::config::{ImageSpec, ModelManifest, RecurrentMode, RecurrentParams};
use crate::engine::{Engine, EngineError, StageError};
use crate::frame::{BBox, Class, DecodeEnd, DecodedItem, Frame, Image, StageOutput, StreamStep};
use crate::postprocess::image;

/// Where stream starts, reconnects and removals are announced to recurrent stages, so that a
/// stream's state starts again or is freed.
#[derive(Debug, Default)]
pub struct StreamResets {
    version: AtomicU64,
    /// Per stream: when it last (re)started on the pipeline clock, and whether it is removed.
    resets: std::sync::Mutex<HashMap<usize, (Nanos, bool)>>,
}

impl StreamResets {
    /// Stream `stream` (re)starts at `at`: its frames captured from then on start from the
    /// initial state.
    pub fn restarted(&self, stream: usize, at: Nanos) {
        self.set(stream, at, false);
    }

    /// Stream `stream` is removed at `at`: its state is freed.
    pub fn removed(&self, stream: usize, at: Nanos) {
        self.set(stream, at, true);
    }

    fn set(&self, stream: usize, at: Nanos, removed: bool) {
        self.resets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stream, (at, removed));
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The removed streams, with when.
    fn removed_now(&self) -> HashMap<usize, Nanos> {
        self.resets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, (_, removed))| *removed)
            .map(|(s, (at, _))| (*s, *at))
            .collect()
    }

    fn restarted_at(&self, stream: usize) -> Option<Nanos> {
        self.resets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stream)
            .and_then(|(at, removed)| (!removed).then_some(*at))
    }
}

/// What a recurrent stage holds, for `/status`.
#[derive(Debug, Default)]
pub struct CellGauges {
    /// Streams whose state is held.
    pub streams: AtomicUsize,
    /// Bytes of held state (streams and items).
    pub state_bytes: AtomicUsize,
    /// Items waiting at or running through the cell.
    pub items: AtomicUsize,
    /// Padding rows run (steps and their rows are the stage's batch counters).
    pub padding: AtomicU64,
}

/// One stream's state between its frames.
struct StreamState {
    state: Vec<ArrayD<f32>>,
    steps: u64,
    /// Capture time of the last frame that advanced it.
    last: Nanos,
    /// That frame's latency budget (deadline - capture).
    slack: Nanos,
}

/// An item running steps.
struct Item {
    frame: u64,
    slot: usize,
    stream: usize,
    /// The normalised image fed at every step (without the batch dimension).
    x: ArrayD<f32>,
    /// Decode: its own state.
    state: Vec<ArrayD<f32>>,
    prev: Option<usize>,
    tokens: Vec<u32>,
    bbox: Option<BBox>,
}

/// How a frame's time at the cell ended.
#[derive(Clone, Copy)]
enum Ended {
    Done,
    Late,
    Failed,
}

struct Pending {
    frame: Frame,
    left: usize,
    decoded: Vec<Option<DecodedItem>>,
    step: Option<StreamStep>,
    /// None while an item of it still runs.
    how: Option<Ended>,
}

/// What a step (or an admission) resolved.
#[derive(Default)]
pub struct Outcome {
    /// Complete frames, in each stream's order.
    pub done: Vec<Frame>,
    /// Frames dropped because an item could not end by the deadline.
    pub late: Vec<Frame>,
    /// Frames whose step failed.
    pub failed: Vec<Frame>,
    /// The error of a failed step.
    pub error: Option<StageError>,
    /// Rows of the step run (0: none ran).
    pub rows: usize,
    /// Of them, padding rows.
    pub padding: usize,
    /// How long it ran.
    pub busy: Nanos,
}

/// A recurrent stage's cell, scheduler and state.
pub struct Recurrent {
    engine: Box<dyn Engine>,
    io: CellIo,
    params: RecurrentParams,
    image: ImageSpec,
    boxes_from: Option<usize>,
    sched: CellScheduler,
    next_id: u64,
    frames: HashMap<u64, Pending>,
    items: HashMap<u64, Item>,
    streams: HashMap<usize, StreamState>,
    /// Per stream, its frames here in arrival order (released in that order).
    order: HashMap<usize, VecDeque<u64>>,
    resets: Option<Arc<StreamResets>>,
    resets_seen: u64,
    /// Removed streams and when, as of the last announcement read.
    removed: HashMap<usize, Nanos>,
    /// Bytes of one stream's (or item's) state.
    state_size: usize,
    /// Removed streams whose state is freed at the given time.
    freeing: Vec<(usize, Nanos)>,
    gauges: Arc<CellGauges>,
}

/// Settings of a [`Recurrent`] stage.
pub struct RecurrentSettings {
    /// How a step's batch is formed.
    pub batching: CellBatching,
    /// Largest step batch.
    pub max_batch: usize,
    /// Drop items that cannot end by their deadline.
    pub drop_late: bool,
    /// Safety margin of that check.
    pub margin: Nanos,
    /// Decode: position of the stage whose boxes are the items (else the frame is the item).
    pub boxes_from: Option<usize>,
}

impl Recurrent {
    /// A stage over a loaded cell.
    pub fn new(
        engine: Box<dyn Engine>,
        m: &ModelManifest,
        s: RecurrentSettings,
    ) -> Result<Self, EngineError> {
        let io = resolve_io(engine.as_ref(), m).map_err(|p| EngineError::Load {
            model: m.path.display().to_string(),
            message: p.join("; "),
        })?;
        let params = m.recurrent.clone().expect("resolve_io checked");
        let state_size = io.states.iter().map(|s| s.initial.len() * 4).sum();
        Ok(Self {
            engine,
            io,
            params,
            image: m.image.clone().unwrap_or_else(ImageSpec::passthrough),
            boxes_from: s.boxes_from,
            sched: CellScheduler::new(s.batching, s.max_batch, s.drop_late, s.margin),
            next_id: 0,
            frames: HashMap::new(),
            items: HashMap::new(),
            streams: HashMap::new(),
            order: HashMap::new(),
            resets: None,
            resets_seen: 0,
            removed: HashMap::new(),
            state_size,
            freeing: Vec::new(),
            gauges: Arc::default(),
        })
    }

    /// Follows stream restarts and removals announced here.
    pub fn with_resets(mut self, resets: Arc<StreamResets>) -> Self {
        self.resets = Some(resets);
        self
    }

    /// Reports what it holds to these gauges.
    pub fn with_gauges(mut self, gauges: Arc<CellGauges>) -> Self {
        self.gauges = gauges;
        self
    }

    /// Whether no frame is here.
    pub fn is_idle(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames here (waiting, running, or complete and held for an earlier one of their stream).
    pub fn frames_held(&self) -> usize {
        self.frames.len()
    }

    /// Every frame held, whatever its state (after a panic, to count them failed).
    pub fn take_all(&mut self) -> Vec<Frame> {
        self.items.clear();
        self.order.clear();
        self.sched = CellScheduler::new(self.sched.batching(), 1, false, 0);
        self.frames.drain().map(|(_, p)| p.frame).collect()
    }

    /// Streams whose state is held.
    pub fn streams_held(&self) -> usize {
        self.streams.len()
    }

    fn item_input(&self, img: &Image, bbox: Option<&BBox>) -> ArrayD<f32> {
        let spec = &self.image;
        let one = |img: &Image| {
            image::batch_tensor(&[img], spec)
                .index_axis_move(Axis(0), 0)
                .into_dyn()
        };
        // A whole frame that already has the cell's size and channel order goes in as it is.
        if bbox.is_none()
            && (img.width, img.height, img.format) == (spec.width, spec.height, spec.pixel_format)
        {
            return one(img);
        }
        let whole = BBox {
            x: 0.0,
            y: 0.0,
            w: img.width as f32,
            h: img.height as f32,
        };
        let (w, h) = (spec.width as usize, spec.height as usize);
        let mut pixels = image::crop_resize(img, bbox.unwrap_or(&whole), w, h);
        if img.format != spec.pixel_format {
            for p in pixels.chunks_exact_mut(3) {
                p.swap(0, 2);
            }
        }
        one(&Image::from_vec(
            spec.width,
            spec.height,
            spec.pixel_format,
            pixels,
        ))
    }

    /// Restarts stream states after announced restarts, and schedules removed streams' states to
    /// be freed once their last frames can no longer arrive (their budget after the removal).
    fn follow_resets(&mut self) {
        let Some(r) = &self.resets else { return };
        let v = r.version();
        if v == self.resets_seen {
            return;
        }
        self.resets_seen = v;
        self.removed = r.removed_now();
        let removed = &self.removed;
        let mut freeing = Vec::new();
        self.streams.retain(|stream, st| {
            if let Some(at) = removed.get(stream) {
                freeing.push((*stream, at + st.slack));
                return true;
            }
            r.restarted_at(*stream).is_none_or(|at| st.last >= at)
        });
        for (stream, at) in freeing {
            self.free_later(stream, at);
        }
    }

    /// Frees removed stream `stream`'s state at `at` (unless it is already due to be).
    fn free_later(&mut self, stream: usize, at: Nanos) {
        if !self.freeing.iter().any(|(s, _)| *s == stream) {
            self.freeing.push((stream, at));
        }
    }

    /// Frees the states of removed streams that are due (none of their frames is here).
    fn free_removed(&mut self, now: Nanos) {
        let (streams, order, removed) = (&mut self.streams, &self.order, &self.removed);
        self.freeing.retain(|(stream, at)| {
            if now < *at || order.contains_key(stream) {
                return true;
            }
            // Not if the stream came back in the meantime.
            if removed.contains_key(stream) {
                streams.remove(stream);
            }
            false
        });
    }

    /// Between steps, with nothing to run: frees what is due.
    pub fn tick(&mut self, clock: &dyn Clock) {
        self.follow_resets();
        self.free_removed(clock.now());
        self.update_gauges();
    }

    /// Takes a frame in: its items wait for the next steps. A decoder's frame without boxes is
    /// complete at once.
    pub fn admit(&mut self, frame: Frame) -> Outcome {
        self.admit_limited(frame, u32::MAX)
    }

    /// [`admit`](Self::admit), with every item of the frame running at most `limit` steps (what
    /// `poolpipe bench recurrent` uses to give items lengths drawn from a distribution).
    pub fn admit_limited(&mut self, frame: Frame, limit: u32) -> Outcome {
        self.follow_resets();
        let key = self.next_id;
        self.next_id += 1;
        let stream = frame.stream;
        let boxes: Option<Vec<BBox>> = match (self.params.mode, self.boxes_from) {
            (RecurrentMode::Decode, Some(j)) => Some(match frame.outputs.get(j) {
                Some(StageOutput::Objects(o)) => o.iter().map(|o| o.bbox).collect(),
                Some(StageOutput::TextBoxes(b)) => b.iter().map(|b| b.bbox).collect(),
                _ => Vec::new(),
            }),
            _ => None,
        };
        let inputs: Vec<(Option<BBox>, ArrayD<f32>)> = match &boxes {
            Some(bs) => bs
                .iter()
                .map(|b| (Some(*b), self.item_input(&frame.image, Some(b))))
                .collect(),
            None => vec![(None, self.item_input(&frame.image, None))],
        };
        let n = inputs.len();
        let limit = self.params.step_limit().min(limit);
        let group = (self.params.mode == RecurrentMode::Stream).then_some(stream as u64);
        for (slot, (bbox, x)) in inputs.into_iter().enumerate() {
            let id = self.next_id;
            self.next_id += 1;
            let state = match self.params.mode {
                RecurrentMode::Decode => self.io.states.iter().map(|s| s.initial.clone()).collect(),
                RecurrentMode::Stream => Vec::new(),
            };
            self.items.insert(
                id,
                Item {
                    frame: key,
                    slot,
                    stream,
                    x,
                    state,
                    prev: None,
                    tokens: Vec::new(),
                    bbox,
                },
            );
            self.sched.push(CellItem {
                id,
                group,
                deadline: frame.deadline,
                limit,
            });
        }
        self.order.entry(stream).or_default().push_back(key);
        self.frames.insert(
            key,
            Pending {
                frame,
                left: n,
                decoded: vec![None; n],
                step: None,
                how: (n == 0).then_some(Ended::Done),
            },
        );
        let mut out = Outcome::default();
        if n == 0 {
            self.release(stream, &mut out);
        }
        self.update_gauges();
        out
    }

    /// Ends frame `key` (late or failed): its other items leave the cell.
    fn resolve(&mut self, key: u64, how: Ended) {
        let ids: Vec<u64> = self
            .items
            .iter()
            .filter(|(_, it)| it.frame == key)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.items.remove(&id);
            self.sched.remove(id);
        }
        if let Some(p) = self.frames.get_mut(&key) {
            p.how = Some(how);
        }
    }

    /// Releases the frames of `stream` that are resolved, up to the first that is not.
    fn release(&mut self, stream: usize, out: &mut Outcome) {
        let Some(q) = self.order.get_mut(&stream) else {
            return;
        };
        while let Some(&key) = q.front() {
            // A frame still running holds back those after it.
            let Some(how) = self.frames.get(&key).map(|p| p.how) else {
                q.pop_front();
                continue;
            };
            let Some(how) = how else { break };
            q.pop_front();
            let Some(mut p) = self.frames.remove(&key) else {
                continue;
            };
            match how {
                Ended::Done => {
                    let output = match p.step.take() {
                        Some(s) => StageOutput::State(s),
                        None => StageOutput::Decoded(p.decoded.into_iter().flatten().collect()),
                    };
                    p.frame.outputs.push(output);
                    out.done.push(p.frame);
                }
                Ended::Late => out.late.push(p.frame),
                Ended::Failed => out.failed.push(p.frame),
            }
        }
        if q.is_empty() {
            self.order.remove(&stream);
        }
    }

    fn state_of<'a>(&'a self, item: &'a Item, k: usize) -> ArrayViewD<'a, f32> {
        match self.params.mode {
            RecurrentMode::Decode => item.state[k].view(),
            RecurrentMode::Stream => self
                .streams
                .get(&item.stream)
                .map_or(self.io.states[k].initial.view(), |s| s.state[k].view()),
        }
    }

    /// Drops items that cannot end in time, then runs one step of the cell over the next batch,
    /// if there is one.
    pub fn step(&mut self, clock: &dyn Clock) -> Outcome {
        self.follow_resets();
        self.free_removed(clock.now());
        let mut out = Outcome::default();
        let mut touched = Vec::new();
        for id in self.sched.take_late(clock.now()) {
            if let Some(key) = self.items.get(&id).map(|it| it.frame) {
                touched.push(self.frames[&key].frame.stream);
                self.resolve(key, Ended::Late);
            }
        }
        if let Some(step) = self.sched.next_step() {
            let t0 = clock.now();
            let result = self.run_step(&step.ids, step.padding);
            let t1 = clock.now();
            out.rows = step.rows();
            out.padding = step.padding;
            out.busy = t1.saturating_sub(t0);
            self.sched.observe(step.rows(), out.busy);
            self.gauges
                .padding
                .fetch_add(step.padding as u64, Ordering::Relaxed);
            match result {
                Ok(outputs) => self.apply(&step.ids, outputs, &mut touched),
                Err(e) => {
                    for id in &step.ids {
                        if let Some(key) = self.items.get(id).map(|it| it.frame) {
                            touched.push(self.frames[&key].frame.stream);
                            self.resolve(key, Ended::Failed);
                        }
                    }
                    out.error = Some(e);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for stream in touched {
            self.release(stream, &mut out);
        }
        self.update_gauges();
        out
    }

    /// Stacks one row per item (and `padding` copies of the first) and runs the cell.
    fn run_step(&mut self, ids: &[u64], padding: usize) -> Result<Vec<ArrayD<f32>>, StageError> {
        let rows: Vec<&Item> = ids
            .iter()
            .map(|id| &self.items[id])
            .chain(std::iter::repeat_n(&self.items[&ids[0]], padding))
            .collect();
        let stack = |views: Vec<ArrayViewD<'_, f32>>| {
            ndarray::stack(Axis(0), &views)
                .map_err(|e| StageError::Output(format!("items of different shapes: {e}")))
        };
        let x = stack(rows.iter().map(|it| it.x.view()).collect())?;
        let mut states = Vec::new();
        for k in 0..self.io.states.len() {
            states.push(stack(rows.iter().map(|it| self.state_of(it, k)).collect())?);
        }
        let feedback = self.io.feedback.as_ref().map(|_| {
            let mut t = ndarray::Array2::<f32>::zeros((rows.len(), self.io.output_len));
            for (i, it) in rows.iter().enumerate() {
                if let Some(tok) = it.prev {
                    t[[i, tok]] = 1.0;
                }
            }
            t.into_dyn()
        });
        let mut feed: Vec<(&str, ArrayViewD<'_, f32>)> = vec![(&self.io.step_input, x.view())];
        for (s, t) in self.io.states.iter().zip(&states) {
            feed.push((&s.input, t.view()));
        }
        if let (Some(name), Some(t)) = (&self.io.feedback, &feedback) {
            feed.push((name, t.view()));
        }
        let outs = self.engine.infer_named(&feed)?;
        let n = rows.len();
        for (i, o) in outs.iter().enumerate() {
            let wanted = i == self.io.output || self.io.states.iter().any(|s| s.output == i);
            if wanted && o.shape().first() != Some(&n) {
                return Err(StageError::Output(format!(
                    "output {i} has shape {:?} for a step of {n} rows",
                    o.shape()
                )));
            }
        }
        if outs.len() <= self.io.output || self.io.states.iter().any(|s| s.output >= outs.len()) {
            return Err(StageError::Output(format!(
                "the cell returned {} outputs",
                outs.len()
            )));
        }
        Ok(outs)
    }

    /// Takes a step's outputs: new states, tokens, ended items, complete frames.
    fn apply(&mut self, ids: &[u64], outs: Vec<ArrayD<f32>>, touched: &mut Vec<usize>) {
        let out = &outs[self.io.output];
        for (row, id) in ids.iter().enumerate() {
            let new_state: Vec<ArrayD<f32>> = self
                .io
                .states
                .iter()
                .map(|s| {
                    outs[s.output]
                        .index_axis(Axis(0), row)
                        .to_shape(IxDyn(&s.shape))
                        .map(|a| a.to_owned())
                        .unwrap_or_else(|_| s.initial.clone())
                })
                .collect();
            let values: Vec<f32> = out.index_axis(Axis(0), row).iter().copied().collect();
            let token = argmax(&values);
            let Some(it) = self.items.get_mut(id) else {
                continue;
            };
            let (key, slot, stream) = (it.frame, it.slot, it.stream);
            let ended_by_token = match self.params.mode {
                RecurrentMode::Decode => {
                    it.state = new_state;
                    let end = self.params.end_token == Some(token);
                    if !end {
                        it.tokens.push(token as u32);
                    }
                    it.prev = Some(token);
                    end
                }
                RecurrentMode::Stream => {
                    let f = &self.frames[&key].frame;
                    let (captured, slack) = (f.captured, f.deadline.saturating_sub(f.captured));
                    let st = self.streams.entry(stream).or_insert_with(|| StreamState {
                        state: Vec::new(),
                        steps: 0,
                        last: captured,
                        slack,
                    });
                    st.state = new_state;
                    st.steps += 1;
                    st.last = captured;
                    st.slack = slack;
                    // A frame of a removed stream that was on its way: freed again later.
                    let removed_at = self.removed.get(&stream).copied();
                    let top = (!values.is_empty()).then(|| Class {
                        id: token,
                        label: self
                            .io
                            .labels
                            .get(token)
                            .cloned()
                            .unwrap_or_else(|| format!("class_{token}")),
                        score: values[token],
                    });
                    let step = StreamStep {
                        step: st.steps,
                        output: values,
                        top,
                    };
                    if let Some(at) = removed_at {
                        self.free_later(stream, at.max(captured) + slack);
                    }
                    if let Some(p) = self.frames.get_mut(&key) {
                        p.step = Some(step);
                    }
                    false
                }
            };
            if !self.sched.stepped(*id, ended_by_token) {
                continue;
            }
            let it = self.items.remove(id).expect("present");
            let Some(p) = self.frames.get_mut(&key) else {
                continue;
            };
            if self.params.mode == RecurrentMode::Decode {
                let text = (!self.io.labels.is_empty()).then(|| {
                    it.tokens
                        .iter()
                        .map(|t| self.io.labels.get(*t as usize).map_or("?", String::as_str))
                        .collect::<String>()
                });
                p.decoded[slot] = Some(DecodedItem {
                    bbox: it.bbox,
                    steps: it.tokens.len() as u32 + u32::from(ended_by_token),
                    tokens: it.tokens,
                    text,
                    end: if ended_by_token {
                        DecodeEnd::EndToken
                    } else {
                        DecodeEnd::MaxSteps
                    },
                });
            }
            p.left -= 1;
            if p.left == 0 {
                p.how = Some(Ended::Done);
                touched.push(stream);
            }
        }
    }

    fn update_gauges(&self) {
        let holders = match self.params.mode {
            RecurrentMode::Stream => self.streams.len(),
            RecurrentMode::Decode => self.items.len(),
        };
        let g = &self.gauges;
        g.streams.store(self.streams.len(), Ordering::Relaxed);
        g.state_bytes
            .store(holders * self.state_size, Ordering::Relaxed);
        g.items.store(self.items.len(), Ordering::Relaxed);
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, x)| {
            if *x > bv { (i, *x) } else { (bi, bv) }
        })
        .0
}
