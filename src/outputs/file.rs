//! `file` outputs: one MP4 recording per stream, rotated by duration or size.
//!
//! Per stream a GStreamer pipeline takes the drawn frames (RGB, timestamped by capture time
//! from the stream's first recorded frame) and encodes them:
//! `appsrc ! videoconvert ! x264enc ! h264parse ! splitmuxsink muxer=mp4mux`. At shutdown (or
//! when a stream's picture size changes) it gets end-of-stream and is waited for, so every file
//! is finalised (its `moov` written) and plays.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::{Job, OutputCounters, draw, sanitize};
use crate::clock::Nanos;
use crate::config::OutputSpec;

/// One stream's recording.
struct Recording {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    size: (u32, u32),
    /// Capture time of its first frame (time 0 of the file).
    first: Nanos,
    last_pts: Option<u64>,
}

/// The launch line of a recording of `stream` at `width` x `height`.
fn launch(spec: &OutputSpec, stream: &str, (width, height): (u32, u32)) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let location = spec
        .folder
        .join(format!("{}-{stamp}-%05d.mp4", sanitize(stream)));
    format!(
        "appsrc name=src is-live=true format=time do-timestamp=false \
         caps=video/x-raw,format=RGB,width={width},height={height},framerate=0/1 \
         ! videoconvert ! video/x-raw,format=I420 \
         ! x264enc tune=zerolatency speed-preset=ultrafast bitrate={} key-int-max=30 \
         ! h264parse ! splitmuxsink name=mux muxer-factory=mp4mux send-keyframe-requests=true \
         max-size-time={} max-size-bytes={} location=\"{}\"",
        spec.bitrate_kbps,
        spec.segment.as_nanos(),
        spec.max_bytes,
        location.display().to_string().replace('"', "\\\"")
    )
}

impl Recording {
    fn start(
        spec: &OutputSpec,
        stream: &str,
        size: (u32, u32),
        first: Nanos,
    ) -> Result<Self, String> {
        if size.0 % 2 == 1 || size.1 % 2 == 1 {
            return Err(format!(
                "{}x{}: H.264 (4:2:0) needs an even width and height",
                size.0, size.1
            ));
        }
        let pipeline = gst::parse::launch(&launch(spec, stream, size))
            .map_err(|e| e.to_string())?
            .downcast::<gst::Pipeline>()
            .map_err(|_| "not a pipeline".to_string())?;
        let src = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or("no appsrc")?;
        src.set_max_bytes(64 * 1024 * 1024);
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| format!("cannot start the recording: {e}"))?;
        tracing::info!(output = %spec.name, stream, folder = %spec.folder.display(), "Recording started.");
        Ok(Recording {
            pipeline,
            src,
            size,
            first,
            last_pts: None,
        })
    }

    fn push(&mut self, data: Vec<u8>, captured: Nanos) -> Result<(), String> {
        let mut pts = captured.saturating_sub(self.first);
        // Timestamps only move forward.
        if let Some(last) = self.last_pts
            && pts <= last
        {
            pts = last + 1_000;
        }
        self.last_pts = Some(pts);
        let mut buffer = gst::Buffer::from_mut_slice(data);
        if let Some(b) = buffer.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds(pts));
        }
        self.src
            .push_buffer(buffer)
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    }

    /// End of stream, waited for (up to 10 s), so that the file is finalised.
    fn finish(self) {
        let _ = self.src.end_of_stream();
        if let Some(bus) = self.pipeline.bus() {
            let msg = bus.timed_pop_filtered(
                gst::ClockTime::from_seconds(10),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            );
            if let Some(m) = msg
                && let gst::MessageView::Error(e) = m.view()
            {
                tracing::warn!(error = %e.error(), "Recording ended with an error.");
            }
        }
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// The output's thread: draws each frame and records it in its stream's file.
pub(super) fn run(spec: &OutputSpec, rx: &flume::Receiver<Job>, counters: &OutputCounters) {
    let mut recordings: HashMap<Arc<str>, Recording> = HashMap::new();
    for job in rx.iter() {
        let canvas = draw(spec, &job);
        let size = (canvas.width, canvas.height);
        if recordings.get(&job.stream).is_some_and(|r| r.size != size)
            && let Some(old) = recordings.remove(&job.stream)
        {
            old.finish();
        }
        if !recordings.contains_key(&job.stream) {
            match Recording::start(spec, &job.stream, size, job.frame.captured) {
                Ok(r) => {
                    recordings.insert(job.stream.clone(), r);
                }
                Err(e) => {
                    counters.failed.fetch_add(1, Relaxed);
                    tracing::warn!(output = %spec.name, stream = %job.stream, error = %e, "Cannot record.");
                    continue;
                }
            }
        }
        let Some(r) = recordings.get_mut(&job.stream) else {
            continue;
        };
        match r.push(canvas.data, job.frame.captured) {
            Ok(()) => {
                counters.written.fetch_add(1, Relaxed);
            }
            Err(e) => {
                counters.failed.fetch_add(1, Relaxed);
                tracing::warn!(output = %spec.name, stream = %job.stream, error = %e, "Frame not recorded.");
            }
        }
    }
    for (_, r) in recordings.drain() {
        r.finish();
    }
}
