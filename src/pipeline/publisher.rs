//! The publisher: the end of the stage graph. A frame that finished by its deadline becomes one
//! JSON result (the schema is in the README) offered to every sink; one that finished late is
//! dropped and counted.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::json;

use super::analytics::Analytics;
use crate::analytics::rules::Event;
use crate::clock::{SharedClock, ms};
use crate::config::Pipeline;
use crate::frame::Frame;
use crate::panics::panic_message;
use crate::sinks::{self, Message, SinkHandle};
use crate::stats::Stats;

/// The JSON object published for a frame of stream `stream` (schema in the README); with the
/// counts of the stream's analytics rules after the frame, if it has any.
pub fn result_json(
    p: &Pipeline,
    stream: &str,
    f: &Frame,
    published: u64,
    analytics: Option<&serde_json::Map<String, serde_json::Value>>,
) -> serde_json::Value {
    let mut stages = serde_json::Map::new();
    let mut results = serde_json::Map::new();
    let chain = p
        .routes
        .get(f.route)
        .map_or(&[][..], |r| r.stages.as_slice());
    for ((spec, spent), out) in chain
        .iter()
        .map(|i| &p.stages[*i])
        .zip(&f.stage_nanos)
        .zip(&f.outputs)
    {
        stages.insert(spec.name.clone(), json!(round3(ms(*spent))));
        results.insert(
            spec.name.clone(),
            serde_json::to_value(out).unwrap_or(serde_json::Value::Null),
        );
    }
    let mut v = frame_header(p, stream, f);
    v.insert(
        "latency_ms".into(),
        json!({
            "end_to_end": round3(ms(published.saturating_sub(f.captured))),
            "stages": stages,
        }),
    );
    v.insert(
        "deadline_slack_ms".into(),
        json!(round3(ms(f.deadline.saturating_sub(published)))),
    );
    v.insert("results".into(), serde_json::Value::Object(results));
    if let Some(a) = analytics.filter(|a| !a.is_empty()) {
        v.insert("analytics".into(), serde_json::Value::Object(a.clone()));
    }
    serde_json::Value::Object(v)
}

/// What every message about a frame starts with: the pipeline, the flow, the stream, the
/// frame's number and times.
fn frame_header(
    p: &Pipeline,
    stream: &str,
    f: &Frame,
) -> serde_json::Map<String, serde_json::Value> {
    let flow = p
        .routes
        .get(f.route)
        .and_then(|r| p.flows.get(r.flow))
        .map(|f| f.name.as_str());
    let mut m = serde_json::Map::new();
    m.insert("pipeline".into(), json!(p.name));
    m.insert("flow".into(), json!(flow));
    if let Some((model, accuracy)) = p.routes.get(f.route).and_then(|r| r.variant.as_ref()) {
        m.insert(
            "variant".into(),
            json!({"model": model, "accuracy": accuracy}),
        );
    }
    m.insert("stream".into(), json!(stream));
    m.insert("seq".into(), json!(f.seq));
    m.insert(
        "pts_ms".into(),
        json!(f.pts.map(|d| round3(d.as_secs_f64() * 1e3))),
    );
    m.insert(
        "captured_at".into(),
        json!(sinks::rfc3339_millis(f.captured_wall)),
    );
    m.insert(
        "captured_at_unix_ms".into(),
        json!(
            f.captured_wall
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        ),
    );
    m
}

/// The JSON object published for an event a rule raised on a frame of stream `stream`: the
/// frame's identity and time, then the event's fields.
pub fn event_json(p: &Pipeline, stream: &str, f: &Frame, e: &Event) -> serde_json::Value {
    let mut v = frame_header(p, stream, f);
    if let Ok(serde_json::Value::Object(ev)) = serde_json::to_value(e) {
        v.extend(ev);
    }
    serde_json::Value::Object(v)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Starts the publisher thread. It ends when every stage has finished, after closing the sinks
/// (each delivers what it holds within its flush timeout).
/// The last frame published on each stream, by stream name (what snapshots draw).
pub type LatestFrames =
    Arc<std::sync::Mutex<std::collections::HashMap<Arc<str>, (Frame, crate::osd::Overlay)>>>;

pub(super) fn spawn_publisher(
    shared: Arc<std::sync::Mutex<Pipeline>>,
    rx: flume::Receiver<Frame>,
    (mut sinks, mut outputs): (Vec<SinkHandle>, Vec<crate::outputs::Output>),
    stats: Arc<Stats>,
    clock: SharedClock,
    analytics: Arc<Analytics>,
    latest: LatestFrames,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("publish".into())
        .spawn(move || {
            // The stream of the frame being published, for counting it if publishing panics.
            let mut current = None;
            let published = catch_unwind(AssertUnwindSafe(|| {
                let ctx = Publishing {
                    shared: &shared,
                    stats: &stats,
                    clock: &clock,
                    analytics: &analytics,
                    latest: &latest,
                };
                publish(&ctx, &rx, &mut sinks, &mut outputs, &mut current);
            }));
            if let Err(e) = published {
                stats.thread_panicked("publisher".into(), panic_message(&*e));
                if let Some(stream) = current {
                    stats.frame_failed_between_stages(stream);
                }
                // What still arrives can no longer be published: count it.
                for f in rx.iter() {
                    stats.frame_failed_between_stages(f.stream);
                }
            }
            for s in sinks {
                let name = s.name().to_string();
                let sum = s.close();
                tracing::debug!(sink = %name, ?sum, "Sink closed.");
            }
            // Recordings are finalised before the pipeline reports that it stopped.
            for o in outputs {
                o.close();
            }
        })
}

/// What the publisher reads and writes besides its queue and sinks.
struct Publishing<'a> {
    /// The running pipeline: its routes and stages name what a result holds (a re-plan adds
    /// routes; a frame on a route this thread has not seen yet makes it read them again).
    shared: &'a std::sync::Mutex<Pipeline>,
    stats: &'a Stats,
    clock: &'a SharedClock,
    analytics: &'a Analytics,
    latest: &'a LatestFrames,
}

fn publish(
    ctx: &Publishing<'_>,
    rx: &flume::Receiver<Frame>,
    sinks: &mut [SinkHandle],
    outputs: &mut [crate::outputs::Output],
    current: &mut Option<usize>,
) {
    let Publishing {
        shared,
        stats,
        clock,
        analytics,
        latest,
    } = *ctx;
    let read = || shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut pipeline = read();
    // Stream names by index (streams added while running are looked up once).
    let mut names: Vec<Arc<str>> = Vec::new();
    for mut f in rx.iter() {
        *current = Some(f.stream);
        if f.route >= pipeline.routes.len() {
            pipeline = read();
        }
        let p = &pipeline;
        while names.len() <= f.stream {
            names.push(stats.stream_name(names.len()));
        }
        // Tracks and rules see every frame that finished, late or not: a late frame's objects
        // still moved, and its events (a line crossed) still happened.
        let found = if analytics.is_active() {
            let t0 = Instant::now();
            let found = analytics.process(&mut f);
            if found.is_some() {
                stats.analytics.record(crate::clock::nanos(t0.elapsed()));
            }
            found
        } else {
            None
        };
        if let Some(a) = &found {
            let offered = Instant::now();
            for (n, e) in a.events.iter().enumerate() {
                let payload: Arc<str> = event_json(p, &names[f.stream], &f, e).to_string().into();
                let rule: Arc<str> = e.rule.as_str().into();
                for s in sinks.iter_mut() {
                    s.offer(Message {
                        rule: Some(rule.clone()),
                        part: n as u32 + 1,
                        ..Message::result(names[f.stream].clone(), f.seq, payload.clone(), offered)
                    });
                }
                stats.event_raised(f.stream);
            }
        }
        let now = clock.now();
        if now > f.deadline {
            stats.frame_finished_late(f.stream);
            *current = None;
            continue;
        }
        // Published = made on time and handed to every sink; what each sink then delivered,
        // retried or dropped is in its own counters.
        let counts = found.as_ref().map(|a| &a.counts);
        // Outputs take the frame (never waiting); a snapshot to be written is named in the
        // result.
        let at = Instant::now();
        // The header's attainment is read only for frames an output takes; a snapshot reads
        // it when asked.
        let overlay = if outputs.is_empty() {
            crate::osd::Overlay {
                e2e_ms: (now - f.captured) as f64 / 1e6,
                attainment: None,
            }
        } else {
            overlay(stats, f.stream, now - f.captured)
        };
        let mut snapshots = serde_json::Map::new();
        for o in outputs.iter_mut() {
            if let Some(path) = o.offer(&names[f.stream], &f, &overlay, at) {
                snapshots.insert(o.spec().name.clone(), json!(path.display().to_string()));
            }
        }
        let mut result = result_json(p, &names[f.stream], &f, now, counts);
        if !snapshots.is_empty()
            && let Some(m) = result.as_object_mut()
        {
            m.insert("snapshots".into(), serde_json::Value::Object(snapshots));
        }
        let payload: Arc<str> = result.to_string().into();
        let offered = Instant::now();
        for s in sinks.iter_mut() {
            s.offer(Message::result(
                names[f.stream].clone(),
                f.seq,
                payload.clone(),
                offered,
            ));
        }
        stats.frame_published(f.stream, now - f.captured);
        *current = None;
        // Kept until the stream's next one: a snapshot draws it on request, off this thread.
        let name = names[f.stream].clone();
        latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, (f, overlay));
    }
}

/// What the display's header says of a frame of `stream` published `e2e` after capture: the
/// latency, and the stream's attainment so far (this frame included).
fn overlay(stats: &Stats, stream: usize, e2e: crate::clock::Nanos) -> crate::osd::Overlay {
    use std::sync::atomic::Ordering::Relaxed;
    let c = stats.stream(stream);
    let published = c.published.load(Relaxed) + 1;
    let missed = c.missed();
    crate::osd::Overlay {
        e2e_ms: e2e as f64 / 1e6,
        attainment: Some(published as f64 / (published + missed) as f64),
    }
}
