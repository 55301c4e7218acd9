//! `poolpipe bench recurrent`: cellular vs padded batching of a recurrent decoder cell, and
//! per-stream state batched across streams vs one step per stream, on the CPU with the generated
//! GRU cells (ONNX Runtime, real time).
//!
//! Decoder items arrive as a Poisson process; each runs a number of steps drawn from a
//! log-normal distribution (median 15, sigma 0.75: mean about 20, p99 about 85, clamped to
//! 1..=120), the same draws for both batchings. The cell's end token is switched off so that an
//! item ends exactly at its drawn length; the compute is the real cell on real images. Policy
//! `fixed` (nothing dropped): latency includes all queueing.

use std::time::Duration;

use serde::Serialize;

use crate::batcher::cell::CellBatching;
use crate::clock::{Clock, Nanos, SystemClock};
use crate::config::{ModelManifest, load_manifest};
use crate::engine::ort::{OrtConfig, OrtEngine};
use crate::frame::{Frame, Image, PixelFormat};
use crate::histogram::Histogram;
use crate::recurrent::{Recurrent, RecurrentSettings};
use crate::sim::arrivals::Rng;

/// One load of the decoder.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    /// `cellular` or `padded`.
    pub batching: CellBatching,
    /// Offered items per second.
    pub rate: f64,
    /// Items offered.
    pub items: usize,
    /// Items completed per second.
    pub throughput: f64,
    /// Latency from arrival to the end of its last step, ms.
    pub p50_ms: f64,
    /// Same, 99th percentile.
    pub p99_ms: f64,
    /// Rows per step (items and padding).
    pub mean_rows: f64,
    /// Share of rows that were padding.
    pub padding_share: f64,
}

/// One per-stream run.
#[derive(Debug, Clone, Serialize)]
pub struct StreamRow {
    /// Streams.
    pub streams: usize,
    /// Largest step batch (1: one step per stream, unbatched).
    pub max_batch: usize,
    /// Frames stepped.
    pub frames: usize,
    /// Frames per second.
    pub fps: f64,
    /// Rows per step.
    pub mean_rows: f64,
    /// Largest step.
    pub max_rows: usize,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Item lengths drawn: mean, p50, p99, max.
    pub lengths: [f64; 4],
    /// Measured step latency of the decoder cell at 1, 4, 16 and `max_batch` rows, ms.
    pub step_ms: Vec<(usize, f64)>,
    /// Largest step batch of the decoder.
    pub max_batch: usize,
    /// The p99 latency bound of the "highest rate within SLO" figure, ms.
    pub slo_ms: f64,
    /// Decoder runs, both batchings at each rate.
    pub decode: Vec<DecodeRow>,
    /// Highest offered rate whose p99 stayed within the SLO: cellular, padded.
    pub max_rate_within_slo: (f64, f64),
    /// Per-stream runs.
    pub streams: Vec<StreamRow>,
}

fn ms(n: f64) -> f64 {
    n / 1e6
}

fn cell(
    m: &ModelManifest,
    batching: CellBatching,
    max_batch: usize,
    threads: usize,
) -> anyhow::Result<Recurrent> {
    let engine = OrtEngine::load(&OrtConfig {
        model: m.onnx.clone().unwrap_or_default(),
        input: None,
        threads,
        library: None,
        optimize: true,
        gpu: None,
        spin: false,
    })?;
    Ok(Recurrent::new(
        Box::new(engine),
        m,
        RecurrentSettings {
            batching,
            max_batch,
            drop_late: false,
            margin: 0,
            boxes_from: None,
        },
    )?)
}

fn images(m: &ModelManifest, n: usize, seed: u64) -> Vec<std::sync::Arc<Image>> {
    let spec = m
        .image
        .clone()
        .unwrap_or_else(crate::config::ImageSpec::passthrough);
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let data = (0..spec.width * spec.height * 3)
                .map(|_| (rng.next_f64() * 256.0) as u8)
                .collect();
            std::sync::Arc::new(Image::from_vec(
                spec.width,
                spec.height,
                PixelFormat::RGB,
                data,
            ))
        })
        .collect()
}

fn frame(stream: usize, seq: u64, image: std::sync::Arc<Image>, captured: Nanos) -> Frame {
    Frame::new(stream, seq, image, captured, Nanos::MAX / 2)
}

/// Item lengths: log-normal (median 15, sigma 0.75), clamped to 1..=120.
fn lengths(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - rng.next_f64(), rng.next_f64());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (15.0 * (0.75 * z).exp()).round().clamp(1.0, 120.0) as u32
        })
        .collect()
}

/// Runs the decoder under Poisson arrivals at `rate` items/s for `seconds`.
fn decode_run(
    m: &ModelManifest,
    batching: CellBatching,
    max_batch: usize,
    rate: f64,
    seconds: f64,
    pool: &[std::sync::Arc<Image>],
) -> anyhow::Result<DecodeRow> {
    let mut c = cell(m, batching, max_batch, 1)?;
    let n = ((rate * seconds) as usize).max(20);
    let lens = lengths(n, 7);
    let mut rng = Rng(11);
    let mut at = Vec::with_capacity(n);
    let mut t: Nanos = 0;
    for _ in 0..n {
        t += rng.exp(rate / 1e9);
        at.push(t);
    }
    let clock = SystemClock::new();
    let start = clock.now();
    let lat = Histogram::default();
    let (mut next, mut done, mut steps, mut rows, mut padding) = (0, 0usize, 0u64, 0u64, 0u64);
    let mut last_done = start;
    // As in a stage, the cell holds a bounded number of items; the rest wait in its queue.
    let hold = 4 * max_batch;
    while done < n {
        let now = clock.now() - start;
        while next < n && at[next] <= now && c.frames_held() < hold {
            let f = frame(
                next,
                next as u64,
                pool[next % pool.len()].clone(),
                start + at[next],
            );
            let o = c.admit_limited(f, lens[next]);
            done += o.done.len();
            next += 1;
        }
        if c.is_idle() {
            if next < n && at[next] > now {
                std::thread::sleep(Duration::from_nanos(at[next] - now));
            }
            continue;
        }
        let o = c.step(&clock);
        if o.rows > 0 {
            steps += 1;
            rows += o.rows as u64;
            padding += o.padding as u64;
        }
        let t = clock.now();
        for f in &o.done {
            lat.record(t - f.captured);
            last_done = t;
        }
        done += o.done.len();
        anyhow::ensure!(o.error.is_none(), "step failed: {:?}", o.error);
    }
    let span = (last_done - start) as f64 / 1e9;
    Ok(DecodeRow {
        batching,
        rate,
        items: n,
        throughput: n as f64 / span.max(1e-9),
        p50_ms: lat.quantile_ms(0.5).unwrap_or(0.0),
        p99_ms: lat.quantile_ms(0.99).unwrap_or(0.0),
        mean_rows: rows as f64 / steps.max(1) as f64,
        padding_share: padding as f64 / rows.max(1) as f64,
    })
}

/// `streams` streams, one step per frame, `frames` frames in all.
fn stream_run(
    m: &ModelManifest,
    streams: usize,
    max_batch: usize,
    frames: usize,
    pool: &[std::sync::Arc<Image>],
) -> anyhow::Result<StreamRow> {
    let mut c = cell(m, CellBatching::Cellular, max_batch, 1)?;
    let clock = SystemClock::new();
    let per = frames / streams;
    let hold = 2 * streams.max(max_batch);
    let start = clock.now();
    let (mut sent, mut done, mut steps, mut rows, mut widest) = (0usize, 0usize, 0u64, 0u64, 0);
    let total = per * streams;
    while done < total {
        // Keep up to `hold` frames here, round robin over the streams (as a stage's queue).
        while sent < total && c.frames_held() < hold {
            let (s, q) = (sent % streams, sent / streams);
            c.admit(frame(
                s,
                q as u64,
                pool[sent % pool.len()].clone(),
                clock.now(),
            ));
            sent += 1;
        }
        let o = c.step(&clock);
        anyhow::ensure!(o.error.is_none(), "step failed: {:?}", o.error);
        steps += 1;
        rows += o.rows as u64;
        widest = widest.max(o.rows);
        done += o.done.len();
    }
    let secs = (clock.now() - start) as f64 / 1e9;
    Ok(StreamRow {
        streams,
        max_batch,
        frames: total,
        fps: total as f64 / secs,
        mean_rows: rows as f64 / steps.max(1) as f64,
        max_rows: widest,
    })
}

/// Step latency of the decoder cell at `rows` rows, ms (median of 50).
fn step_ms(m: &ModelManifest, rows: usize, pool: &[std::sync::Arc<Image>]) -> anyhow::Result<f64> {
    let mut c = cell(m, CellBatching::Cellular, rows, 1)?;
    let clock = SystemClock::new();
    for i in 0..rows {
        c.admit_limited(frame(i, 0, pool[i % pool.len()].clone(), 0), 1000);
    }
    let mut t = Vec::new();
    for _ in 0..60 {
        let o = c.step(&clock);
        t.push(o.busy);
    }
    t.drain(..10);
    t.sort_unstable();
    Ok(ms(t[t.len() / 2] as f64))
}

/// Runs the benchmark.
pub fn run(root: &std::path::Path, seconds: f64, max_batch: usize) -> anyhow::Result<Report> {
    let mut dec = load_manifest(&root.join("engines/gru-decoder.toml"))
        .map_err(|e| anyhow::anyhow!("{e} (run ./setup.sh, which generates the cells)"))?;
    if let Some(r) = dec.recurrent.as_mut() {
        r.end_token = None;
        r.max_steps = Some(1000);
    }
    let stream = load_manifest(&root.join("engines/gru-stream.toml"))
        .map_err(|e| anyhow::anyhow!("{e} (run ./setup.sh, which generates the cells)"))?;
    let pool = images(&dec, 64, 3);
    let spool = images(&stream, 64, 5);

    let mut sizes = vec![1, 4, 16, max_batch];
    sizes.dedup();
    let mut steps = Vec::new();
    for r in sizes {
        steps.push((r, step_ms(&dec, r, &pool)?));
    }
    let lens = lengths(20_000, 7);
    let mut sorted = lens.clone();
    sorted.sort_unstable();
    let mean_len = lens.iter().map(|l| *l as f64).sum::<f64>() / lens.len() as f64;
    let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p) as usize] as f64;
    let lengths_stat = [
        mean_len,
        q(0.5),
        q(0.99),
        *sorted.last().unwrap_or(&0) as f64,
    ];
    // Cellular's capacity: full steps of `max_batch` rows, each item taking `mean` of them.
    let full = steps.last().map_or(1.0, |s| s.1);
    let capacity = max_batch as f64 / (mean_len * full / 1e3);
    eprintln!(
        "steps {steps:?} ms; lengths {lengths_stat:?}; estimated capacity {capacity:.0} items/s"
    );
    // The bound: 4x the p99 length run alone, one step after another.
    let slo_ms = 4.0 * lengths_stat[2] * steps[0].1;
    let fractions = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0];
    let mut decode = Vec::new();
    for f in fractions {
        let rate = (capacity * f).round().max(1.0);
        for b in [CellBatching::Cellular, CellBatching::Padded] {
            let row = decode_run(&dec, b, max_batch, rate, seconds, &pool)?;
            eprintln!(
                "{:?} {:.0}/s: {:.0}/s p50 {:.2} ms p99 {:.2} ms",
                b, rate, row.throughput, row.p50_ms, row.p99_ms
            );
            decode.push(row);
        }
    }
    let best = |b: CellBatching| {
        decode
            .iter()
            .filter(|r| r.batching == b && r.p99_ms <= slo_ms)
            .map(|r| r.rate)
            .fold(0.0, f64::max)
    };
    let max_rate = (best(CellBatching::Cellular), best(CellBatching::Padded));
    let mut streams = Vec::new();
    for n in [8, 32, 128] {
        for mb in [1, n.min(64)] {
            streams.push(stream_run(&stream, n, mb, 4096, &spool)?);
        }
    }
    Ok(Report {
        lengths: lengths_stat,
        step_ms: steps,
        max_batch,
        slo_ms,
        decode,
        max_rate_within_slo: max_rate,
        streams,
    })
}

impl Report {
    /// The report as text tables.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let l = self.lengths;
        s += &format!(
            "decoder item lengths (log-normal, median 15, sigma 0.75): mean {:.1}, p50 {:.0}, p99 {:.0}, max {:.0} steps\n",
            l[0], l[1], l[2], l[3]
        );
        s += "step latency of the decoder cell:";
        for (r, m) in &self.step_ms {
            s += &format!("  {r} rows {m:.3} ms");
        }
        s += &format!(
            "\n\ndecoder, max_batch {}, Poisson arrivals\n{:>9} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9}\n",
            self.max_batch,
            "batching",
            "offered/s",
            "completed/s",
            "p50 ms",
            "p99 ms",
            "rows/step",
            "padding"
        );
        for r in &self.decode {
            s += &format!(
                "{:>9} {:>10.0} {:>12.0} {:>10.2} {:>10.2} {:>10.1} {:>8.0}%\n",
                format!("{:?}", r.batching).to_lowercase(),
                r.rate,
                r.throughput,
                r.p50_ms,
                r.p99_ms,
                r.mean_rows,
                r.padding_share * 100.0
            );
        }
        s += "\np99 cellular / padded at the same offered rate:";
        for pair in self.decode.chunks(2) {
            if let [c, p] = pair {
                s += &format!("  {:.0}/s {:.2}", c.rate, c.p99_ms / p.p99_ms.max(1e-9));
            }
        }
        let (c, p) = self.max_rate_within_slo;
        s += &format!(
            "\nhighest offered rate with p99 <= {:.1} ms: cellular {:.0}/s, padded {:.0}/s ({})\n",
            self.slo_ms,
            c,
            p,
            if p > 0.0 {
                format!("{:.2}x", c / p)
            } else {
                "padded meets it at no rate tried".into()
            }
        );
        s += &format!(
            "\nper-stream state (GRU cell), frames of all streams queued\n{:>8} {:>10} {:>8} {:>10} {:>10} {:>9}\n",
            "streams", "max_batch", "frames", "frames/s", "rows/step", "max rows"
        );
        for r in &self.streams {
            s += &format!(
                "{:>8} {:>10} {:>8} {:>10.0} {:>10.1} {:>9}\n",
                r.streams, r.max_batch, r.frames, r.fps, r.mean_rows, r.max_rows
            );
        }
        for pair in self.streams.chunks(2) {
            if let [one, many] = pair {
                s += &format!(
                    "{} streams: batched / one step per stream = {:.2}x frames/s\n",
                    one.streams,
                    many.fps / one.fps.max(1e-9)
                );
            }
        }
        s
    }
}
