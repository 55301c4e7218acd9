//! Recurrent stages on the generated GRU cells (real ONNX Runtime): per-stream state and per-item
//! decoding give exactly what running each stream's frames, or each item, alone through the cell
//! gives, whatever the interleaving and batch sizes; a stream's state starts and is freed with
//! the stream; items that cannot end in time are dropped and counted; bad cells are refused.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{header, http, require, start, stop, write};
use ndarray::{ArrayD, IxDyn};
use poolpipe::batcher::cell::CellBatching;
use poolpipe::clock::{Clock, Nanos};
use poolpipe::config::{ModelManifest, load_manifest};
use poolpipe::engine::Engine;
use poolpipe::engine::ort::{OrtConfig, OrtEngine};
use poolpipe::frame::{Frame, Image, PixelFormat, StageOutput};
use poolpipe::postprocess::image::batch_tensor;
use poolpipe::recurrent::{Outcome, Recurrent, RecurrentSettings, StreamResets};

fn manifest(name: &str) -> ModelManifest {
    require(&format!(
        "engines/recurrent/{}.onnx",
        name.replace('-', "_")
    ));
    load_manifest(&common::root().join(format!("engines/{name}.toml"))).unwrap()
}

fn engine(m: &ModelManifest) -> OrtEngine {
    OrtEngine::load(&OrtConfig {
        model: m.onnx.clone().unwrap(),
        input: None,
        threads: 1,
        library: None,
        optimize: true,
        gpu: None,
        spin: false,
    })
    .unwrap()
}

fn cell(m: &ModelManifest, batching: CellBatching, max_batch: usize, drop_late: bool) -> Recurrent {
    Recurrent::new(
        Box::new(engine(m)),
        m,
        RecurrentSettings {
            batching,
            max_batch,
            drop_late,
            margin: 0,
            boxes_from: None,
        },
    )
    .unwrap()
}

/// A deterministic pseudo-random image of the model's input size.
fn image(m: &ModelManifest, seed: u64) -> Arc<Image> {
    let spec = m.image.as_ref().unwrap();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let n = (spec.width * spec.height * 3) as usize;
    // Brightness varies by seed, so that items differ in more than noise.
    let level = (seed % 7) as u32 * 30;
    let data = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((x >> 33) % 64) as u32 + level).min(255) as u8
        })
        .collect();
    Arc::new(Image::from_vec(
        spec.width,
        spec.height,
        PixelFormat::RGB,
        data,
    ))
}

fn frame(stream: usize, seq: u64, image: Arc<Image>, captured: Nanos, deadline: Nanos) -> Frame {
    Frame::new(stream, seq, image, captured, deadline)
}

/// A clock that moves 1 ms at every reading: each step "takes" 1 ms.
#[derive(Debug, Default)]
struct TickClock(AtomicU64);

impl Clock for TickClock {
    fn now(&self) -> Nanos {
        self.0.fetch_add(1_000_000, Ordering::SeqCst)
    }
}

fn output_index(e: &OrtEngine, name: &str) -> usize {
    e.info()
        .outputs
        .iter()
        .position(|t| t.name == name)
        .unwrap()
}

/// The cell's outputs for one item, run alone (batch of one) straight on the engine.
fn run_alone(e: &mut OrtEngine, feed: &[(&str, ArrayD<f32>)]) -> Vec<ArrayD<f32>> {
    let views: Vec<(&str, ndarray::ArrayViewD<'_, f32>)> =
        feed.iter().map(|(n, a)| (*n, a.view())).collect();
    e.infer_named(&views).unwrap()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)
}

/// Steps until nothing is held; returns every outcome merged, and the largest step.
fn drain(c: &mut Recurrent, clock: &dyn Clock, into: &mut Outcome) -> usize {
    let mut widest = 0;
    while !c.is_idle() {
        let o = c.step(clock);
        widest = widest.max(o.rows);
        assert!(o.error.is_none(), "{:?}", o.error);
        into.done.extend(o.done);
        into.late.extend(o.late);
        into.failed.extend(o.failed);
    }
    widest
}

#[test]
fn per_stream_state_gives_each_stream_what_running_it_alone_gives() {
    let m = manifest("gru-stream");
    let spec = m.image.clone().unwrap();
    let (streams, frames) = (5usize, 12u64);
    // Reference: each stream alone, one frame at a time, its state carried by hand.
    let mut e = engine(&m);
    let (h_out, scores) = (output_index(&e, "h_out"), output_index(&e, "scores"));
    let h0: Vec<f32> = e
        .metadata("h0")
        .unwrap()
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    let mut want: HashMap<(usize, u64), Vec<f32>> = HashMap::new();
    for s in 0..streams {
        let mut h = ArrayD::from_shape_vec(IxDyn(&[1, 64]), h0.clone()).unwrap();
        for q in 0..frames {
            let img = image(&m, s as u64 * 100 + q);
            let x = batch_tensor(&[&img], &spec).into_dyn();
            let out = run_alone(&mut e, &[("image", x), ("h_in", h.clone())]);
            h = out[h_out].clone();
            want.insert((s, q), out[scores].iter().copied().collect());
        }
    }
    for (batching, max_batch) in [
        (CellBatching::Cellular, 1),
        (CellBatching::Cellular, 3),
        (CellBatching::Cellular, 8),
        (CellBatching::Padded, 4),
    ] {
        let mut c = cell(&m, batching, max_batch, false);
        let clock = TickClock::default();
        // Interleave the streams unevenly (stream s sends a frame every s+1 turns), admitting a
        // varying number of frames between steps.
        let mut next = vec![0u64; streams];
        let mut out = Outcome::default();
        let mut widest = 0;
        let mut turn = 0u64;
        while next.iter().any(|n| *n < frames) {
            for (s, seq) in next.iter_mut().enumerate() {
                if *seq < frames && turn.is_multiple_of(s as u64 + 1) {
                    let img = image(&m, s as u64 * 100 + *seq);
                    out.done
                        .extend(c.admit(frame(s, *seq, img, 0, u64::MAX / 2)).done);
                    *seq += 1;
                }
            }
            for _ in 0..(turn % 3) {
                let o = c.step(&clock);
                widest = widest.max(o.rows);
                out.done.extend(o.done);
            }
            turn += 1;
        }
        widest = widest.max(drain(&mut c, &clock, &mut out));
        assert_eq!(
            out.done.len(),
            streams * frames as usize,
            "{batching:?} {max_batch}"
        );
        let mut last_seq: HashMap<usize, u64> = HashMap::new();
        for f in &out.done {
            if let Some(prev) = last_seq.insert(f.stream, f.seq) {
                assert!(f.seq > prev, "a stream's frames leave in order");
            }
            let Some(StageOutput::State(st)) = f.outputs.last() else {
                panic!("no state output: {:?}", f.outputs);
            };
            assert_eq!(st.step, f.seq + 1, "one step per frame");
            let w = &want[&(f.stream, f.seq)];
            assert!(
                close(&st.output, w),
                "{batching:?} batch {max_batch}: stream {} frame {}: {:?} vs alone {:?}",
                f.stream,
                f.seq,
                st.output,
                w
            );
        }
        if max_batch > 1 {
            assert!(
                widest > 1,
                "{batching:?} {max_batch}: steps batched several streams"
            );
        }
        assert!(widest <= max_batch);
    }
}

/// Runs one decoder item alone: its tokens (end token left out) and steps.
fn decode_alone(e: &mut OrtEngine, m: &ModelManifest, img: &Image) -> (Vec<u32>, u32) {
    let spec = m.image.clone().unwrap();
    let r = m.recurrent.as_ref().unwrap();
    let (h_out, c_out, logits) = (
        output_index(e, "h_out"),
        output_index(e, "c_out"),
        output_index(e, "logits"),
    );
    let x = batch_tensor(&[img], &spec).into_dyn();
    let mut h = ArrayD::<f32>::zeros(IxDyn(&[1, 64]));
    let mut cnt = ArrayD::<f32>::zeros(IxDyn(&[1, 1]));
    let mut tok = ArrayD::<f32>::zeros(IxDyn(&[1, 16]));
    let mut tokens = Vec::new();
    for step in 1..=r.max_steps.unwrap() {
        let out = run_alone(
            e,
            &[
                ("image", x.clone()),
                ("token", tok.clone()),
                ("h_in", h.clone()),
                ("c_in", cnt.clone()),
            ],
        );
        h = out[h_out].clone();
        cnt = out[c_out].clone();
        let l: Vec<f32> = out[logits].iter().copied().collect();
        let t = (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b });
        if Some(t) == r.end_token {
            return (tokens, step);
        }
        tokens.push(t as u32);
        tok = ArrayD::<f32>::zeros(IxDyn(&[1, 16]));
        tok[[0, t]] = 1.0;
    }
    (tokens, r.max_steps.unwrap())
}

#[test]
fn per_item_decoding_gives_each_item_what_decoding_it_alone_gives() {
    let m = manifest("gru-decoder");
    let n = 24u64;
    let mut e = engine(&m);
    let want: Vec<(Vec<u32>, u32)> = (0..n)
        .map(|i| decode_alone(&mut e, &m, &image(&m, i)))
        .collect();
    let lengths: Vec<u32> = want.iter().map(|w| w.1).collect();
    assert!(
        lengths.iter().min() != lengths.iter().max(),
        "items of different lengths: {lengths:?}"
    );
    for (batching, max_batch) in [(CellBatching::Cellular, 8), (CellBatching::Padded, 8)] {
        let mut c = cell(&m, batching, max_batch, false);
        let clock = TickClock::default();
        let mut out = Outcome::default();
        let mut widest = 0;
        // Items arrive while others are mid-way: 3 at a time, 4 steps apart.
        for i in 0..n {
            out.done.extend(
                c.admit(frame(i as usize % 3, i, image(&m, i), 0, u64::MAX / 2))
                    .done,
            );
            if i % 3 == 2 {
                for _ in 0..4 {
                    let o = c.step(&clock);
                    widest = widest.max(o.rows);
                    out.done.extend(o.done);
                }
            }
        }
        widest = widest.max(drain(&mut c, &clock, &mut out));
        assert_eq!(out.done.len(), n as usize);
        for f in &out.done {
            let Some(StageOutput::Decoded(items)) = f.outputs.last() else {
                panic!("no decoded output: {:?}", f.outputs);
            };
            assert_eq!(items.len(), 1, "the frame is the item");
            let (tokens, steps) = &want[f.seq as usize];
            assert_eq!(
                (&items[0].tokens, items[0].steps),
                (tokens, *steps),
                "{batching:?}: item {} decoded in a batch differs from alone",
                f.seq
            );
            let text = items[0].text.as_deref().unwrap();
            assert_eq!(
                text.chars().count(),
                tokens.len(),
                "one character per token"
            );
        }
        assert!(
            widest > 3,
            "{batching:?}: items joined running steps: {widest}"
        );
    }
}

#[test]
fn items_that_cannot_end_in_time_are_dropped_and_every_frame_is_accounted_for() {
    let m = manifest("gru-decoder");
    let mut c = cell(&m, CellBatching::Cellular, 8, true);
    let clock = TickClock::default();
    let mut out = Outcome::default();
    // Items with room learn the lengths (about 20 to 40 steps of 1 ms each).
    for i in 0..8 {
        c.admit(frame(0, i, image(&m, i), 0, u64::MAX / 2));
    }
    drain(&mut c, &clock, &mut out);
    assert_eq!((out.done.len(), out.late.len()), (8, 0));
    // 10 ms left: none can end.
    let now = clock.now();
    for i in 8..12 {
        c.admit(frame(1, i, image(&m, i), now, now + 10_000_000));
    }
    // Room for them: they end.
    for i in 12..14 {
        c.admit(frame(2, i, image(&m, i), now, now + 10_000_000_000));
    }
    let mut rest = Outcome::default();
    drain(&mut c, &clock, &mut rest);
    let late: Vec<u64> = rest.late.iter().map(|f| f.seq).collect();
    let done: Vec<u64> = rest.done.iter().map(|f| f.seq).collect();
    assert_eq!(late, vec![8, 9, 10, 11]);
    assert_eq!(done, vec![12, 13]);
    assert!(rest.failed.is_empty());
}

#[test]
fn a_restarted_stream_starts_from_the_initial_state_and_a_removed_one_is_freed() {
    let m = manifest("gru-stream");
    let resets = Arc::new(StreamResets::default());
    let mut c = cell(&m, CellBatching::Cellular, 4, false).with_resets(resets.clone());
    let clock = TickClock::default();
    const MS: Nanos = 1_000_000;
    let budget = 50 * MS;
    let step_of = |o: &Outcome| match o.done[0].outputs.last() {
        Some(StageOutput::State(s)) => (s.step, s.output.clone()),
        other => panic!("{other:?}"),
    };
    let mut first = Vec::new();
    for (seq, at) in [(0u64, 10), (1, 20), (2, 30)] {
        c.admit(frame(0, seq, image(&m, seq), at * MS, at * MS + budget));
        first.push(step_of(&c.step(&clock)));
    }
    assert_eq!(first[2].0, 3);
    c.admit(frame(1, 0, image(&m, 99), 15 * MS, 15 * MS + budget));
    c.step(&clock);
    assert_eq!(c.streams_held(), 2);
    // Stream 0 reconnects at 40 ms: its next frame starts again, as its first did.
    resets.restarted(0, 40 * MS);
    c.admit(frame(0, 3, image(&m, 0), 50 * MS, 50 * MS + budget));
    let again = step_of(&c.step(&clock));
    assert_eq!(again.0, 1, "a reconnected stream starts at step 1");
    assert!(close(&again.1, &first[0].1), "from the initial state");
    // Stream 1 is removed at 60 ms; a frame it sent before is still on its way and goes on
    // from its state; once no frame of it can still come (its budget after the removal), the
    // state is freed.
    resets.removed(1, 60 * MS);
    c.admit(frame(1, 1, image(&m, 98), 55 * MS, 55 * MS + budget));
    assert_eq!(
        step_of(&c.step(&clock)).0,
        2,
        "the frame on its way continues"
    );
    assert_eq!(c.streams_held(), 2);
    while clock.now() < 60 * MS + budget {
        c.tick(&clock);
    }
    c.tick(&clock);
    assert_eq!(c.streams_held(), 1, "the removed stream's state is freed");
}

/// A pipeline file in `dir` with this SLO, these sources and stages and a JSON-lines sink;
/// returns its path, the sink's file and where the summary goes.
fn pipeline_in(
    dir: &std::path::Path,
    slo_ms: u64,
    sources_and_stages: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let out = dir.join("out.jsonl");
    let text = format!(
        "{}{sources_and_stages}\n[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        header("rec", slo_ms),
        out.display()
    );
    (write(dir, "p.toml", &text), out, dir.join("summary.json"))
}

/// `recurrent` of stage `stage` in `/status`.
fn cell_status(api: &str, stage: &str) -> serde_json::Value {
    common::status(api)["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap()["recurrent"]
        .clone()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stream_added_through_the_api_starts_fresh_and_its_state_goes_when_it_is_removed() {
    require("engines/recurrent/gru_stream.onnx");
    let dir = tempfile::tempdir().unwrap();
    // A removed stream's state is freed one SLO after the removal.
    let (p, out, summary) = pipeline_in(
        dir.path(),
        2000,
        "[[source]]\nname = \"a\"\nuri = \"test://ball\"\nmax_fps = 20\n\n\
         [[stage]]\nname = \"temporal\"\nmodel = \"gru-stream\"\nmax_batch = 8\n",
    );
    let (child, api) = start(&p, &summary, &["--api", "127.0.0.1:0", "--serve"], &[]);
    wait_for("stream a's state", || {
        cell_status(&api, "temporal")["streams_held"] == 1
    });
    let one = cell_status(&api, "temporal")["state_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(one, 64 * 4, "one 64-float state");
    let (code, body) = common::add_stream(
        &api,
        r#"{"name": "b", "uri": "test://snow", "max_fps": 20}"#,
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    wait_for("stream b's state", || {
        cell_status(&api, "temporal")["streams_held"] == 2
    });
    assert_eq!(cell_status(&api, "temporal")["state_bytes"], 2 * one);
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = http("DELETE", &format!("{api}/streams/b"), None, None);
    assert!(code == 200 || code == 204, "{code} {body}");
    wait_for("stream b's state to be freed", || {
        cell_status(&api, "temporal")["state_bytes"] == one
    });
    assert_eq!(cell_status(&api, "temporal")["streams_held"], 1);
    let (_, metrics) = http("GET", &format!("{api}/metrics"), None, None);
    assert!(
        metrics.contains(&format!(
            "poolpipe_recurrent_state_bytes{{stage=\"temporal\"}} {one}"
        )),
        "{metrics}"
    );
    assert!(stop(child).success());
    let lines = common::read_jsonl(&out);
    let steps = |stream: &str| -> Vec<(u64, u64)> {
        lines
            .iter()
            .filter(|l| l["stream"] == stream)
            .map(|l| {
                (
                    l["seq"].as_u64().unwrap(),
                    l["results"]["temporal"]["state"]["step"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let b = steps("b");
    assert!(b.len() > 3, "b published: {b:?}");
    assert_eq!(b[0], (0, 1), "b's first frame is its state's first step");
    assert!(
        b.iter().all(|(seq, step)| step == &(seq + 1)),
        "one step per frame of b: {b:?}"
    );
    let a = steps("a");
    assert!(
        a.last().unwrap().1 > b.len() as u64,
        "a's state went on: {a:?}"
    );
    let summary = common::read_summary(&summary);
    common::assert_balanced(&summary);
}

#[test]
fn a_decoder_over_boxes_runs_one_item_per_box_as_each_alone() {
    use poolpipe::frame::{BBox, Object};
    use poolpipe::postprocess::image::crop_resize;
    let m = manifest("gru-decoder");
    let mut e = engine(&m);
    let mut c = Recurrent::new(
        Box::new(engine(&m)),
        &m,
        RecurrentSettings {
            batching: CellBatching::Cellular,
            max_batch: 8,
            drop_late: false,
            margin: 0,
            boxes_from: Some(0),
        },
    )
    .unwrap();
    let clock = TickClock::default();
    let big = |seed: u64| {
        let mut x = seed;
        let data = (0..64 * 48 * 3)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as u8 / 4).wrapping_add((i % 200) as u8)
            })
            .collect();
        Arc::new(Image::from_vec(64, 48, PixelFormat::RGB, data))
    };
    let boxes = |n: usize| -> Vec<BBox> {
        (0..n)
            .map(|k| BBox {
                x: 4.0 + 9.0 * k as f32,
                y: 2.0 + 5.0 * k as f32,
                w: 20.0 + 3.0 * k as f32,
                h: 16.0,
            })
            .collect()
    };
    let mut out = Outcome::default();
    for (seq, n) in [(0u64, 2usize), (1, 0), (2, 3)] {
        let mut f = frame(0, seq, big(seq), 0, u64::MAX / 2);
        f.outputs.push(StageOutput::Objects(
            boxes(n)
                .into_iter()
                .map(|b| Object {
                    label: "thing".into(),
                    class_id: 0,
                    score: 0.9,
                    bbox: b,
                    track_id: None,
                })
                .collect(),
        ));
        out.done.extend(c.admit(f).done);
    }
    drain(&mut c, &clock, &mut out);
    let seqs: Vec<u64> = out.done.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2], "in order, the frame without boxes too");
    for f in &out.done {
        let Some(StageOutput::Decoded(items)) = f.outputs.last() else {
            panic!("{:?}", f.outputs);
        };
        let want = boxes([2, 0, 3][f.seq as usize]);
        assert_eq!(items.len(), want.len(), "one item per box");
        for (item, b) in items.iter().zip(&want) {
            assert_eq!(item.bbox, Some(*b));
            let crop = Image::from_vec(16, 16, PixelFormat::RGB, crop_resize(&f.image, b, 16, 16));
            let (tokens, steps) = decode_alone(&mut e, &m, &crop);
            assert_eq!((&item.tokens, item.steps), (&tokens, steps));
        }
    }
}

/// Loads a pipeline whose engines folder is `dir` (with the repository's cells beside it).
fn diagnostics(dir: &std::path::Path, stages: &str) -> Vec<poolpipe::config::Diagnostic> {
    let text = format!(
        "[pipeline]\nname = \"x\"\nslo_ms = 1000\nengines_dir = \"{}\"\n\n[[source]]\nname = \"t\"\nuri = \"test://ball\"\n\n{stages}\n[[sink]]\ntype = \"jsonl\"\n",
        dir.display()
    );
    match poolpipe::config::load_pipeline_str(&dir.join("p.toml"), &text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

#[test]
fn bad_cells_and_bad_wiring_are_refused_with_file_line_and_key() {
    require("engines/recurrent/gru_decoder.onnx");
    require("engines/ppocr/ch_PP-OCRv4_det_infer.onnx");
    let dir = tempfile::tempdir().unwrap();
    let engines = common::root().join("engines");
    let onnx = engines.join("recurrent/gru_decoder.onnx");
    let cell = |state: &str, end: &str| {
        format!(
            "name = \"c\"\nkind = \"recurrent\"\nonnx = \"{}\"\ninput = \"image\"\n\n[image]\nwidth = 16\nheight = 16\n\n\
             [recurrent]\nmode = \"decode\"\noutput = \"logits\"\nstate = {state}\nfeedback = {{ input = \"token\" }}\n{end}",
            onnx.display()
        )
    };
    let both = r#"[{ input = "h_in", output = "h_out" }, { input = "c_in", output = "c_out" }]"#;
    // A state output of another shape than its input.
    write(
        dir.path(),
        "bad-state.toml",
        &cell(
            r#"[{ input = "h_in", output = "logits" }, { input = "c_in", output = "c_out" }]"#,
            "end_token = 0\n",
        ),
    );
    // A decoder that never ends.
    write(dir.path(), "no-end.toml", &cell(both, ""));
    write(dir.path(), "good.toml", &cell(both, "max_steps = 5\n"));
    write(
        dir.path(),
        "det.toml",
        &format!(
            "name = \"det\"\nkind = \"text_detect\"\nonnx = \"{}\"\n\n[image]\nwidth = 320\nheight = 320\n",
            engines.join("ppocr/ch_PP-OCRv4_det_infer.onnx").display()
        ),
    );
    let stream = std::fs::read_to_string(engines.join("gru-stream.toml"))
        .unwrap()
        .replace(
            "onnx = \"recurrent/gru_stream.onnx\"",
            &format!(
                "onnx = \"{}\"",
                engines.join("recurrent/gru_stream.onnx").display()
            ),
        );
    write(dir.path(), "stream.toml", &stream);

    let errs = diagnostics(
        dir.path(),
        "[[stage]]\nname = \"s\"\nmodel = \"bad-state\"\n",
    );
    assert!(
        errs.iter().any(|d| d.key == "stage[0].model"
            && d.line == 12
            && d.message.contains("bad-state.toml")
            && d.message.contains(
                "state output `logits` has shape [N, 16] but its input `h_in` has [N, 64]"
            )),
        "{errs:#?}"
    );

    let errs = diagnostics(dir.path(), "[[stage]]\nname = \"s\"\nmodel = \"no-end\"\n");
    assert!(
        errs.iter().any(|d| d.file.ends_with("no-end.toml")
            && d.key == "recurrent.mode"
            && d.line == 11
            && d.message.contains("a decoder needs an end condition")),
        "{errs:#?}"
    );

    // A per-stream cell fed by a stage that emits per-box items.
    let errs = diagnostics(
        dir.path(),
        "[[stage]]\nname = \"det\"\nmodel = \"det\"\n\n[[stage]]\nname = \"temporal\"\nmodel = \"stream\"\ninput = \"det\"\n",
    );
    assert!(
        errs.iter().any(|d| d.key == "stage[1].input"
            && d.line == 17
            && d.message.contains("emits per-box items")),
        "{errs:#?}"
    );

    // The same decoder with an end condition, over the detector's boxes, is fine; `batching`
    // elsewhere is not.
    let ok = diagnostics(
        dir.path(),
        "[[stage]]\nname = \"det\"\nmodel = \"det\"\n\n[[stage]]\nname = \"read\"\nmodel = \"good\"\ninput = \"det\"\nbatching = \"padded\"\n",
    );
    assert!(ok.is_empty(), "{ok:#?}");
    let errs = diagnostics(
        dir.path(),
        "[[stage]]\nname = \"det\"\nmodel = \"det\"\nbatching = \"padded\"\n",
    );
    assert!(
        errs.iter().any(|d| d.key == "stage[0].batching"),
        "{errs:#?}"
    );
}

#[test]
fn the_shipped_recurrent_pipeline_runs_on_the_sample_clip_and_a_test_stream() {
    require("engines/recurrent/gru_stream.onnx");
    require("samples/campus.mp4");
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let p = common::root().join("pipelines/recurrent.toml");
    let o = common::poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--duration",
        "4",
        "--summary-json",
        summary.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let streams = common::assert_balanced(&common::read_summary(&summary));
    for name in ["north-gate", "pattern"] {
        let mine: Vec<&serde_json::Value> = lines.iter().filter(|l| l["stream"] == name).collect();
        assert!(mine.len() > 10, "{name} published {}", mine.len());
        assert_eq!(
            streams[name]["published"].as_u64().unwrap() as usize,
            mine.len()
        );
        // Per-stream state: the step counts the stream's frames that reached the stage.
        let steps: Vec<u64> = mine
            .iter()
            .map(|l| l["results"]["temporal"]["state"]["step"].as_u64().unwrap())
            .collect();
        assert!(
            steps.windows(2).all(|w| w[1] == w[0] + 1),
            "{name}: {steps:?}"
        );
        for l in &mine {
            let items = l["results"]["decode"]["decoded"].as_array().unwrap();
            assert_eq!(items.len(), 1, "the frame is the decoder's item");
            let steps = items[0]["steps"].as_u64().unwrap();
            assert!((1..=80).contains(&steps), "{l}");
        }
    }
}

#[test]
fn a_camera_that_reconnects_starts_its_state_again() {
    require("engines/recurrent/gru_stream.onnx");
    let sample = require("samples/campus.mp4");
    let port = common::free_port();
    let mut server = Some(common::start_rtsp_server(sample.to_str().unwrap(), port));
    let dir = tempfile::tempdir().unwrap();
    let (p, out, summary) = pipeline_in(
        dir.path(),
        60_000,
        &format!(
            "[[source]]\nname = \"cam\"\nuri = \"rtsp://127.0.0.1:{port}/cam\"\nlatency_ms = 100\n\
             reconnect_min_ms = 200\nreconnect_max_ms = 800\nstall_timeout_ms = 2000\n\n\
             [[stage]]\nname = \"temporal\"\nmodel = \"gru-stream\"\nmax_batch = 4\n"
        ),
    );
    let run = std::process::Command::new(common::bin())
        .args([
            "run",
            p.to_str().unwrap(),
            "--duration",
            "12",
            "--summary-json",
        ])
        .arg(&summary)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut run = common::KillOnDrop(run);
    std::thread::sleep(Duration::from_secs(4));
    drop(server.take()); // the camera goes away
    std::thread::sleep(Duration::from_secs(2));
    server = Some(common::start_rtsp_server(sample.to_str().unwrap(), port));
    assert!(run.0.wait().unwrap().success());
    drop(server);
    let streams = common::assert_balanced(&common::read_summary(&summary));
    assert!(streams["cam"]["reconnects"].as_u64().unwrap() >= 1);
    let steps: Vec<u64> = common::read_jsonl(&out)
        .iter()
        .map(|l| l["results"]["temporal"]["state"]["step"].as_u64().unwrap())
        .collect();
    // One session before the outage and one after: each counts 1, 2, 3, ...
    let restarts: Vec<usize> = (1..steps.len()).filter(|i| steps[*i] == 1).collect();
    assert_eq!(steps.first(), Some(&1), "{steps:?}");
    assert!(
        !restarts.is_empty(),
        "the state started again after the reconnect: {steps:?}"
    );
    for w in steps.windows(2) {
        assert!(w[1] == w[0] + 1 || w[1] == 1, "{steps:?}");
    }
    assert!(
        steps[restarts[0] - 1] > 10 && steps.len() - restarts[0] > 10,
        "frames on both sides of the outage: {steps:?}"
    );
}

#[test]
fn a_recurrent_stage_that_panics_makes_run_exit_1_and_every_frame_is_accounted_for() {
    require("engines/recurrent/gru_decoder.onnx");
    let dir = tempfile::tempdir().unwrap();
    let (p, out, summary) = pipeline_in(
        dir.path(),
        60_000,
        "[[source]]\nname = \"cam\"\nuri = \"test://ball\"\nnum_buffers = 100000\npace = \"fast\"\n\n\
         [[stage]]\nname = \"decode\"\nmodel = \"gru-decoder\"\nworkers = 2\nmax_batch = 8\n",
    );
    let o = std::process::Command::new(common::bin())
        .args(["run", p.to_str().unwrap(), "--api", "off", "--summary-json"])
        .arg(&summary)
        .env("POOLPIPE_PANIC_STAGE", "decode:200")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("injected by POOLPIPE_PANIC_STAGE at step 200"),
        "{stderr}"
    );
    let summary = common::read_summary(&summary);
    let streams = common::assert_balanced(&summary);
    let cam = &streams["cam"];
    assert!(cam["failed"].as_u64().unwrap() >= 1, "{summary}");
    assert!(cam["published"].as_u64().unwrap() >= 1, "{summary}");
    assert_eq!(
        common::read_jsonl(&out).len() as u64,
        cam["published"].as_u64().unwrap()
    );
}
